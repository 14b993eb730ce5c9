"""The steering stages as Python functions: no Hydra app, no command line, same code and configs.

    from steering.api import load_model, localise, steer_and_evaluate

    bundle = load_model("model=gemma3_270m")                 # once; shared by every call
    summary = localise("model=gemma3_270m", "target=hi", model_bundle=bundle,
                       cache_dir="runs/cache", sae_dir="runs/saes", out_dir="runs/loc-hi")
    report = steer_and_evaluate("model=gemma3_270m", "target=hi", model_bundle=bundle,
                                cache_dir="runs/cache", localise_dir="runs/loc-hi",
                                out_dir="runs/steer-hi", methods=["foxp2_learned", "caa_window"],
                                primary="foxp2_learned")
    report["methods"]["foxp2_learned"]["artifact"]   # → a folder steering.steer() loads

Each function composes the app's config exactly as ``foxp2-localise`` / ``foxp2-steer`` would
(``conf/localise.yaml`` / ``conf/steer.yaml`` with the same structured schemas), so a misspelt
key or a bad value fails the same way. Arguments as in :mod:`sae_train.api`: ``*overrides`` are
Hydra override strings (the way to pick a config group, e.g. ``"model=tiny_llama"``), ``**values``
are keys set on the composed config as Python values (``lift={"n_prompts": 8}``).
``model_bundle`` — ``(model, tokenizer, info)`` from :func:`load_model` — lets several stages and
targets share one loaded model (the demo does); without it each call loads the configured model.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


def compose_config(app: str, *overrides: str, **values: Any) -> DictConfig:
    """The config ``foxp2-localise`` (``app="localise"``) or ``foxp2-steer``
    (``app="steer"``) would run with ``overrides`` on its command line, then ``values`` set."""
    from sae_train.api import compose_app

    if app == "localise":
        from steering.localise.config import register_localise_configs as register
    elif app == "steer":
        from steering.evaluate.config import register_steer_configs as register
    else:
        raise ValueError(f"app={app!r}: use 'localise' (foxp2-localise) or 'steer' (foxp2-steer)")
    register()
    return compose_app(app, overrides, values)


def load_model(*overrides: str, **values: Any) -> tuple:
    """``(model, tokenizer, info)`` of the ``model`` config group choice (e.g.
    ``"model=gemma3_270m"``), loaded as every stage loads it."""
    from sae_train.models.loading import load_model as load

    return load(compose_config("steer", *overrides, **values).model)


def localise(*overrides: str, model_bundle: tuple | None = None,
             config: DictConfig | None = None, **values: Any) -> dict:
    """Run ``foxp2-localise`` (Neural FOXP2 stages I–II for one target): returns its
    summary (window, per-layer K, |N_t|, files); outputs under ``out_dir``."""
    from steering.localise.run import run_localise

    return run_localise(_config("localise", overrides, config, values), model_bundle)


def steer_and_evaluate(*overrides: str, model_bundle: tuple | None = None,
                       config: DictConfig | None = None, **values: Any) -> dict:
    """Run ``foxp2-steer`` (stage III for one target: build, tune and evaluate every method):
    returns the report (``methods`` → metrics, tuned strengths, artifact folder; ``bars``;
    ``files``); outputs under ``out_dir``."""
    from steering.evaluate.pipeline import run_steer

    return run_steer(_config("steer", overrides, config, values), model_bundle)


def _config(app: str, overrides: tuple[str, ...], config: DictConfig | None,
            values: dict[str, Any]) -> DictConfig:
    if config is None:
        return compose_config(app, *overrides, **values)
    if overrides or values:
        raise TypeError("give either config= or overrides/values, not both")
    return config
