"""Save and load SAEs as ``<dir>/{cfg.json, sae.safetensors}``; also read sparsify / SAELens folders.

Our files use sparsify's tensor names (``encoder.weight`` (n_latents, d_in), ``encoder.bias``,
``W_dec`` (n_latents, d_in), ``b_dec``; plus ``threshold`` for jumprelu/batchtopk) and write
sparsify's config keys (``d_in``, ``num_latents``, ``k``) next to our own, so a top-k SAE saved
here also opens with sparsify's reader. Saved SAEs always take raw activations (the training-time
input scale is folded into the weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from sae_train.saes.base import SparseAutoencoder
from sae_train.saes.registry import build_sae, sae_config

FORMAT = "foxp2-sae"
FORMAT_VERSION = 1
CONFIG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
SAELENS_WEIGHTS_NAME = "sae_weights.safetensors"


class SAEFormatError(ValueError):
    """A folder that is not a readable SAE (names what is missing or unsupported)."""


def save_sae(sae: SparseAutoencoder, path: str | Path, metadata: Optional[dict] = None,
             dtype: torch.dtype = torch.float32) -> Path:
    """Write ``sae`` (input scale folded, training state untouched) to ``path``; returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = sae.folded_state()
    tensors = {"encoder.weight": state.pop("W_enc"), "encoder.bias": state.pop("b_enc"),
               "W_dec": state.pop("W_dec"), "b_dec": state.pop("b_dec"), **state}
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in tensors.items()}
    config = sae.config.to_dict()
    config["n_latents"] = sae.n_latents
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": sae.config.kind,
           "d_in": sae.d_in, "num_latents": sae.n_latents,
           "normalize_decoder": bool(sae.config.unit_norm_decoder),
           "input_scale_folded": True, "config": config, "metadata": metadata or {}}
    if hasattr(sae.config, "k"):
        cfg["k"] = int(sae.config.k)
    tmp_weights = path / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp_weights), metadata={"format": FORMAT})
    tmp_weights.replace(path / WEIGHTS_NAME)
    tmp_cfg = path / (CONFIG_NAME + ".tmp")
    tmp_cfg.write_text(json.dumps(cfg, indent=2, default=str))
    tmp_cfg.replace(path / CONFIG_NAME)
    return path


def load_sae(path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
    """Load an SAE folder written by :func:`save_sae`, by sparsify, or by SAELens.

    The SAE comes back in eval mode; ``sae.metadata`` holds what was saved with it (site, cache,
    training summary) or the foreign config.
    """
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise SAEFormatError(f"{path} is not an SAE folder: {CONFIG_NAME} is missing")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") == FORMAT:
        sae, tensors = _ours(cfg, _weights(path / WEIGHTS_NAME))
    elif (path / WEIGHTS_NAME).is_file():
        sae, tensors = _sparsify(cfg, _weights(path / WEIGHTS_NAME), path)
    elif (path / SAELENS_WEIGHTS_NAME).is_file():
        sae, tensors = _saelens(cfg, _weights(path / SAELENS_WEIGHTS_NAME), path)
    else:
        raise SAEFormatError(f"{path} has {CONFIG_NAME} but neither {WEIGHTS_NAME} (ours, "
                             f"sparsify) nor {SAELENS_WEIGHTS_NAME} (SAELens)")
    _check_shapes(sae, tensors, path)
    sae.load_folded_state(tensors)
    sae.metadata = cfg.get("metadata", cfg)
    return sae.to(device=device, dtype=dtype).eval()


def load_saes(root: str | Path, **kwargs) -> dict[str, SparseAutoencoder]:
    """Every SAE folder directly under ``root`` (``<root>/<site>/cfg.json``), by folder name."""
    root = Path(root)
    found = {p.parent.name: load_sae(p.parent, **kwargs) for p in sorted(root.glob(f"*/{CONFIG_NAME}"))}
    if not found:
        raise SAEFormatError(f"no SAE folders (*/{CONFIG_NAME}) under {root}")
    return found


# ---------------------------------------------------------------------- readers
def _weights(file: Path) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float32) for k, v in load_file(str(file)).items()}


def _require(tensors: dict, names: list[str], path: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEFormatError(f"{path}: weights file lacks {missing}; it has {sorted(tensors)}")


def _ours(cfg: dict, tensors: dict) -> tuple[SparseAutoencoder, dict]:
    config = dict(cfg["config"])
    config["n_latents"] = cfg["num_latents"]
    sae = build_sae(sae_config(config), cfg["d_in"])
    out = {"W_enc": tensors.pop("encoder.weight"), "b_enc": tensors.pop("encoder.bias"),
           "W_dec": tensors.pop("W_dec"), "b_dec": tensors.pop("b_dec"), **tensors}
    return sae, out


def _sparsify(cfg: dict, tensors: dict, path: Path) -> tuple[SparseAutoencoder, dict]:
    _require(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], path)
    if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in tensors:
        raise SAEFormatError(f"{path}: sparsify transcoders / skip connections are not supported")
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{path}: sparsify activation {cfg.get('activation')!r} is not "
                             "supported (only topk)")
    if "d_in" not in cfg or "k" not in cfg:
        raise SAEFormatError(f"{path}: a sparsify cfg.json needs d_in and k; it has {sorted(cfg)}")
    d_in = int(cfg["d_in"])
    n_latents = int(cfg.get("num_latents") or 0) or tensors["encoder.weight"].shape[0]
    sae = build_sae({"kind": "topk", "n_latents": n_latents, "k": int(cfg["k"]),
                     "unit_norm_decoder": False}, d_in)
    return sae, {"W_enc": tensors["encoder.weight"], "b_enc": tensors["encoder.bias"],
                 "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}


_SAELENS_KINDS = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}


def _saelens(cfg: dict, tensors: dict, path: Path) -> tuple[SparseAutoencoder, dict]:
    architecture = cfg.get("architecture", "standard")
    if architecture not in _SAELENS_KINDS:
        raise SAEFormatError(f"{path}: SAELens architecture {architecture!r} is not supported; "
                             f"supported: {sorted(_SAELENS_KINDS)}")
    normalization = cfg.get("normalize_activations") or "none"
    if normalization != "none":
        raise SAEFormatError(f"{path}: SAELens normalize_activations={normalization!r} needs "
                             "statistics that are not in the folder; only 'none' is supported")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise SAEFormatError(f"{path}: rescale_acts_by_decoder_norm is not supported")
    _require(tensors, ["W_enc", "b_enc", "W_dec", "b_dec"], path)
    kind = _SAELENS_KINDS[architecture]
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    config: dict[str, Any] = {"kind": kind, "n_latents": d_sae, "unit_norm_decoder": False}
    if kind == "topk":
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            raise SAEFormatError(f"{path}: a SAELens topk config needs k")
        config["k"] = int(k)
    sae = build_sae(config, d_in)
    W_enc = tensors["W_enc"].t().contiguous()  # SAELens: (d_in, d_sae)
    b_enc = tensors["b_enc"]
    if not cfg.get("apply_b_dec_to_input", True):
        # Their encoder reads x, ours x − b_dec: move W_enc·b_dec into the encoder bias.
        b_enc = b_enc + W_enc @ tensors["b_dec"]
    out = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    if kind == "jumprelu":
        _require(tensors, ["threshold"], path)
        out["threshold"] = tensors["threshold"]
    return sae, out


def _check_shapes(sae: SparseAutoencoder, tensors: dict, path: Path) -> None:
    expected = {"W_enc": (sae.n_latents, sae.d_in), "b_enc": (sae.n_latents,),
                "W_dec": (sae.n_latents, sae.d_in), "b_dec": (sae.d_in,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise SAEFormatError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"expected {shape} for d_in={sae.d_in}, n_latents={sae.n_latents}")
