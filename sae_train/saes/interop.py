"""Converters between our SAEs and the SAELens 6.x / sparsify file layouts.

Writers return ``(cfg, tensors, weights_file_name)`` for :func:`sae_train.saes.io.save_sae`;
readers turn a foreign ``(cfg, tensors)`` into ``(our SAE, tensors in our folded layout)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_train.saes.base import SparseAutoencoder
from sae_train.saes.registry import build_sae

SAELENS_WEIGHTS_NAME = "sae_weights.safetensors"
SPARSIFY_WEIGHTS_NAME = "sae.safetensors"
# The SAELens version whose config layout we write (6.x: no pre-6.0 key renaming on load).
SAELENS_LAYOUT_VERSION = "6.0.0"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class SAEFormatError(ValueError):
    """A folder that is not a readable SAE (names what is missing or unsupported)."""


# ---------------------------------------------------------------------- writers
def saelens_files(sae: SparseAutoencoder, metadata: dict, dtype: torch.dtype):
    """SAELens inference layout: W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec
    [, threshold (d_sae,)], and a cfg that ``SAE.load_from_disk`` accepts as is."""
    kind = sae.config.kind
    state = sae.folded_state()
    tensors = {"W_enc": state["W_enc"].t(), "b_enc": state["b_enc"], "W_dec": state["W_dec"],
               "b_dec": state["b_dec"]}
    cfg: dict[str, Any] = {"d_in": sae.d_in, "d_sae": sae.n_latents,
                           "dtype": _DTYPE_NAMES[dtype], "device": "cpu",
                           "apply_b_dec_to_input": True, "normalize_activations": "none",
                           "reshape_activations": "none"}
    if kind == "topk":
        cfg.update(architecture="topk", k=int(sae.config.k), rescale_acts_by_decoder_norm=False)
    elif kind == "relu":
        cfg["architecture"] = "standard"
    elif kind in ("jumprelu", "batchtopk"):
        threshold = state["threshold"].reshape(-1).expand(sae.n_latents)
        if (threshold < 0).any():
            raise SAEFormatError(f"{kind} SAE has no calibrated inference threshold yet "
                                 "(train it before exporting to SAELens)")
        cfg["architecture"] = "jumprelu"
        tensors["threshold"] = threshold
    else:
        raise SAEFormatError(f"SAE kind {kind!r} has no SAELens equivalent")
    cfg["metadata"] = {**metadata, "sae_lens_version": SAELENS_LAYOUT_VERSION,
                       "foxp2_kind": kind, "hook_name": metadata.get("site")}
    tensors = {n: t.detach().to("cpu", dtype).contiguous() for n, t in tensors.items()}
    return cfg, tensors, SAELENS_WEIGHTS_NAME


def sparsify_files(sae: SparseAutoencoder, metadata: dict, dtype: torch.dtype):
    """sparsify's layout (``SparseCoder.save_to_disk``); TopK only."""
    kind = sae.config.kind
    if kind != "topk":
        raise SAEFormatError(f"sparsify has no {kind!r} SAE (its only activations are topk and "
                             "groupmax): export with export.format=native or saelens")
    state = sae.folded_state()
    tensors = {"encoder.weight": state["W_enc"], "encoder.bias": state["b_enc"],
               "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    tensors = {n: t.detach().to("cpu", dtype).contiguous() for n, t in tensors.items()}
    cfg = {"activation": "topk", "expansion_factor": max(1, sae.n_latents // sae.d_in),
           "normalize_decoder": bool(sae.config.unit_norm_decoder),
           "num_latents": sae.n_latents, "k": int(sae.config.k), "multi_topk": False,
           "skip_connection": False, "transcode": False, "d_in": sae.d_in,
           "metadata": metadata}  # (sparsify drops keys it does not know)
    return cfg, tensors, SPARSIFY_WEIGHTS_NAME


# ---------------------------------------------------------------------- readers
def _require(tensors: dict, names: list[str], path: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEFormatError(f"{path}: weights file lacks {missing}; it has {sorted(tensors)}")


def _int_field(cfg: dict, key: str, path: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SAEFormatError(f"{path}: cfg.json needs a positive integer {key!r}, has {value!r}")
    return value


def sparsify_to_ours(cfg: dict, tensors: dict, path: Path) -> tuple[SparseAutoencoder, dict]:
    _require(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], path)
    if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in tensors:
        raise SAEFormatError(f"{path}: sparsify transcoders / skip connections are not supported")
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{path}: sparsify activation {cfg.get('activation')!r} is not "
                             "supported (only topk)")
    if "threshold" in tensors:
        raise SAEFormatError(f"{path}: a sparsify-style folder with a threshold tensor is not a "
                             "TopK SAE")
    d_in, k = _int_field(cfg, "d_in", path), _int_field(cfg, "k", path)
    n_latents = int(cfg.get("num_latents") or 0) or tensors["encoder.weight"].shape[0]
    sae = build_sae({"kind": "topk", "n_latents": n_latents, "k": min(k, n_latents),
                     "unit_norm_decoder": False}, d_in)
    return sae, {"W_enc": tensors["encoder.weight"], "b_enc": tensors["encoder.bias"],
                 "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}


_SAELENS_KINDS = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu",
                  "batchtopk": "batchtopk"}


def _saelens_config(cfg: dict, path: Path) -> dict[str, Any]:
    architecture = cfg.get("architecture", "standard")
    if architecture not in _SAELENS_KINDS:
        raise SAEFormatError(f"{path}: SAELens architecture {architecture!r} is not supported; "
                             f"supported: {sorted(_SAELENS_KINDS)}")
    normalization = cfg.get("normalize_activations") or "none"
    if normalization != "none":
        raise SAEFormatError(f"{path}: SAELens normalize_activations={normalization!r} needs "
                             "statistics that are not in the folder; only 'none' is supported")
    kind = _SAELENS_KINDS[architecture]
    config: dict[str, Any] = {"kind": kind, "n_latents": _int_field(cfg, "d_sae", path),
                              "unit_norm_decoder": False}
    if kind in ("topk", "batchtopk"):
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            raise SAEFormatError(f"{path}: a SAELens {architecture} config needs k")
        config["k"] = int(k)
    return config


def saelens_to_ours(cfg: dict, tensors: dict, path: Path) -> tuple[SparseAutoencoder, dict]:
    """SAELens inference or training saves. ``rescale_acts_by_decoder_norm`` (TopK training
    default) is folded: latent j's encoder column and bias × ‖d_j‖, its decoder row ÷ ‖d_j‖ —
    the same selection, codes and reconstruction with plain TopK."""
    config = _saelens_config(cfg, path)
    _require(tensors, ["W_enc", "b_enc", "W_dec", "b_dec"], path)
    sae = build_sae(config, _int_field(cfg, "d_in", path))
    W_enc = tensors["W_enc"].t().contiguous()  # SAELens: (d_in, d_sae)
    b_enc, W_dec, b_dec = tensors["b_enc"], tensors["W_dec"], tensors["b_dec"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=-1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        # Their encoder reads x, ours x − b_dec: move W_enc·b_dec into the encoder bias.
        b_enc = b_enc + W_enc @ b_dec
    out = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if config["kind"] == "jumprelu":
        if "threshold" not in tensors and "log_threshold" in tensors:
            tensors["threshold"] = tensors["log_threshold"].exp()
        _require(tensors, ["threshold"], path)
        out["threshold"] = tensors["threshold"]
    elif config["kind"] == "batchtopk":
        _require(tensors, ["topk_threshold"], path)
        out["threshold"] = tensors["topk_threshold"].reshape(1).expand(config["n_latents"])
    return sae, out
