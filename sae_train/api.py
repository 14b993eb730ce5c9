"""The SAE stages as Python functions: no Hydra app, no command line, same code and configs.

    from sae_train import cache_activations, train_saes

    manifest = cache_activations("model=tiny_llama", cache={"dir": "/tmp/c", "dtype": "float32"})
    result = train_saes("logger=csv", "trainer=cpu", cache_dir="/tmp/c", out_dir="/tmp/saes",
                        sites="layers.1.resid", sae={"n_latents": 256, "k": 16})
    result.exported["layers.1.resid"]        # → /tmp/saes/layers.1.resid (load_sae reads it)

Each function composes the app's config exactly as its command line would (``conf/cache.yaml``
or ``conf/train.yaml`` with the same structured schemas), so a misspelt key or a wrong type
fails the same way. Two kinds of arguments:

- ``*overrides``: Hydra override strings, as typed after the command (``"model=tiny_llama"``,
  ``"sae=relu"``, ``"cache.dtype=float32"``) — the way to choose a config group's option;
- ``**values``: keys set on the composed config afterwards, as Python values (dicts for nested
  keys: ``cache={"dir": ...}``, lists as lists), checked against the schema.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf, open_dict

App = Literal["cache", "train"]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What :func:`train_saes` produced."""

    # site → folder with cfg.json + sae.safetensors, absolute (sae_train.saes.load_sae reads it).
    exported: dict[str, Path]
    # Final logged metrics, e.g. "val/layers.1.resid/fvu".
    metrics: dict[str, float]
    # The run folder, absolute: checkpoints, logs and (by default) the exported SAEs.
    out_dir: Path


def compose_config(app: App, *overrides: str, **values: Any) -> DictConfig:
    """The config ``sae-cache`` (``app="cache"``) or ``sae-train`` (``app="train"``) would run
    with ``overrides`` on its command line, then ``values`` set on it.

    Works with or without an active Hydra run. ``sae-train``'s ``out_dir`` defaults to the run
    folder Hydra would create (``<paths.root>/train/<date>_<time>``).
    """
    if app == "cache":
        from sae_train.config import register_configs

        register_configs()
    elif app == "train":
        from sae_train.training.config import register_train_configs

        register_train_configs()
    else:
        raise ValueError(f"app={app!r}: use 'cache' (sae-cache) or 'train' (sae-train)")
    cfg = compose_app(app, overrides, values)
    if app == "train":
        default_out_dir(cfg)
    return cfg


def compose_app(config_name: str, overrides: tuple[str, ...] | list[str],
                values: dict[str, Any]) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides``, then ``values`` set on it (its
    schema registered by the caller); with or without an active Hydra run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sae_train.apps import config_dir

    if GlobalHydra.instance().is_initialized():  # called from inside a Hydra app
        cfg = compose(config_name=config_name, overrides=list(overrides))
    else:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    for key, value in values.items():
        # merge=True: a dict updates the nested keys it names and leaves the others.
        OmegaConf.update(cfg, key, value, merge=True)
    return cfg


def default_out_dir(cfg: DictConfig) -> DictConfig:
    """Outside a Hydra run, replace ``out_dir: ${hydra:runtime.output_dir}`` by the folder the
    app would have used (``<paths.root>/train/<date>_<time>``); inside one, leave it."""
    from hydra.core.hydra_config import HydraConfig

    raw = OmegaConf.to_container(cfg, resolve=False).get("out_dir")
    if isinstance(raw, str) and "${hydra:" in raw and not HydraConfig.initialized():
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        with open_dict(cfg):
            cfg.out_dir = str(Path(cfg.paths.root) / "train" / stamp)
    return cfg


def cache_activations(*overrides: str, config: DictConfig | None = None,
                      **values: Any) -> dict[str, Any]:
    """Run ``sae-cache``: the model once over the corpus, activations stored at every site.

    Args:
        overrides: command-line overrides (``"model=tiny_llama"``, ``"data=opus100_en_es"``).
        config: a config from :func:`compose_config` (then give no overrides or values).
        values: keys set on the config (``cache={"dir": "/tmp/c"}``, ``sites=[...]``).

    Returns the finished cache's manifest (``n_tokens``, ``sites``, ``shards``, ...); the cache
    is at ``cache.dir`` and opens with :class:`sae_train.cache.ActivationCache`. A second call
    with the same config resumes or verifies the cache; a different config in the same folder is
    refused with the differing keys named.
    """
    from sae_train.apps.cache_app import run_cache

    return run_cache(_config("cache", overrides, config, values))


def train_saes(*overrides: str, config: DictConfig | None = None, **values: Any) -> TrainResult:
    """Run ``sae-train``: one SAE per selected cached site, trained together with Lightning,
    exported as ``<out_dir>/<site>/{cfg.json, sae.safetensors}``.

    Args:
        overrides: command-line overrides (``"sae=relu"``, ``"trainer=cpu"``, ``"logger=csv"``).
        config: a config from :func:`compose_config` (then give no overrides or values).
        values: keys set on the config (``cache_dir=...``, ``sites="layers.*.resid"``,
            ``max_tokens=100_000``, ``sae={"k": 16}``, ``out_dir=...``).

    Returns a :class:`TrainResult`. Without ``out_dir`` the run goes to
    ``<paths.root>/train/<date>_<time>`` as the app's would. The default logger is wandb
    (offline); ``"logger=csv"`` writes CSV instead.
    """
    from sae_train.apps.train_app import run_training

    cfg = _config("train", overrides, config, values)
    result = run_training(cfg)
    exported = {site: Path(path).resolve() for site, path in result["exported"].items()}
    return TrainResult(exported=exported, metrics=result["metrics"],
                       out_dir=Path(cfg.out_dir).resolve())


def _config(app: App, overrides: tuple[str, ...], config: DictConfig | None,
            values: dict[str, Any]) -> DictConfig:
    if config is None:
        return compose_config(app, *overrides, **values)
    if overrides or values:
        raise TypeError("give either config= or overrides/values, not both (set values on the "
                        "config with OmegaConf.update, or pass them to compose_config)")
    return default_out_dir(config) if app == "train" else config
