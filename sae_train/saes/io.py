"""Save and load SAEs: our native folders, SAELens 6.x folders and sparsify folders.

Every format is ``<dir>/cfg.json`` + one safetensors file; saved SAEs always take raw
activations (the training-time input scale is folded into the weights).

- ``native`` (``sae.safetensors``): sparsify's tensor names (``encoder.weight`` (n_latents, d_in),
  ``encoder.bias``, ``W_dec`` (n_latents, d_in), ``b_dec``; plus ``threshold`` for
  jumprelu/batchtopk) and sparsify's config keys (``d_in``, ``num_latents``, ``k``,
  ``activation``) next to ours. ``architecture`` and ``activation`` name the kind explicitly:
  sparsify reads a TopK folder and refuses every other kind (its ``activation`` field has no
  relu/jumprelu/batchtopk), and :func:`load_sae` refuses a cfg whose kind fields disagree with
  each other or with the tensors.
- ``saelens`` (``sae_weights.safetensors``): what ``sae_lens.SAE.load_from_disk`` (6.x) reads:
  topk → ``topk``, relu → ``standard``, jumprelu → ``jumprelu``, batchtopk → ``jumprelu`` with
  its calibrated threshold on every latent.
- ``sparsify``: exactly sparsify's own layout; TopK only (sparsify has no other activation).

:func:`load_sae` reads all three, plus SAELens' own training saves (``topk`` with
``rescale_acts_by_decoder_norm``, folded on load; ``batchtopk`` with ``topk_threshold``).
:func:`load_pretrained_sae` fetches one SAE folder of a Hub repository (SAELens release layout
``<repo>/<sae_id>/`` or sparsify's ``<repo>/<hookpoint>/``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_train.saes.base import SparseAutoencoder
from sae_train.saes.interop import (SAELENS_WEIGHTS_NAME, SAEFormatError, saelens_files,
                                    saelens_to_ours, sparsify_files, sparsify_to_ours)
from sae_train.saes.registry import SAE_CLASSES, build_sae, sae_config

FORMAT = "foxp2-sae"
FORMAT_VERSION = 1
CONFIG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
EXPORT_FORMATS = ("native", "saelens", "sparsify")
# Kinds whose weights include a per-latent (or scalar) inference threshold.
_THRESHOLD_KINDS = ("jumprelu", "batchtopk")

__all__ = ["FORMAT", "CONFIG_NAME", "WEIGHTS_NAME", "SAELENS_WEIGHTS_NAME", "EXPORT_FORMATS",
           "SAEFormatError", "save_sae", "load_sae", "load_saes", "load_pretrained_sae"]


def _native_files(sae: SparseAutoencoder, metadata: dict, dtype: torch.dtype):
    state = sae.folded_state()
    tensors = {"encoder.weight": state.pop("W_enc"), "encoder.bias": state.pop("b_enc"),
               "W_dec": state.pop("W_dec"), "b_dec": state.pop("b_dec"), **state}
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in tensors.items()}
    config = sae.config.to_dict()
    config["n_latents"] = sae.n_latents
    kind = sae.config.kind
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": kind,
           "kind": kind, "activation": kind, "d_in": sae.d_in, "num_latents": sae.n_latents,
           "normalize_decoder": bool(sae.config.unit_norm_decoder),
           "input_scale_folded": True, "config": config, "metadata": metadata}
    if hasattr(sae.config, "k"):
        cfg["k"] = int(sae.config.k)
    return cfg, tensors, WEIGHTS_NAME


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path`` (readers never see half a file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_sae(sae: SparseAutoencoder, path: str | Path, metadata: Optional[dict] = None,
             dtype: torch.dtype = torch.float32, format: str = "native") -> Path:
    """Write ``sae`` (input scale folded, training state untouched) to ``path`` in ``format``
    (``native``, ``saelens`` or ``sparsify``; see the module docstring); returns ``path``."""
    writers = {"native": _native_files, "saelens": saelens_files, "sparsify": sparsify_files}
    if format not in writers:
        raise SAEFormatError(f"unknown SAE export format {format!r}; use one of "
                             f"{', '.join(EXPORT_FORMATS)}")
    cfg, tensors, weights_name = writers[format](sae, dict(metadata or {}), dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / weights_name,
                  lambda tmp: save_file(tensors, tmp, metadata={"format": format}))
    text = json.dumps(cfg, indent=2, default=str)
    _atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    other = {WEIGHTS_NAME, SAELENS_WEIGHTS_NAME} - {weights_name}
    for name in other:  # a previous export in another format would be read first
        (path / name).unlink(missing_ok=True)
    return path


def load_sae(path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
    """Load an SAE folder written by :func:`save_sae` (any format), by sparsify, or by SAELens.

    The SAE comes back in eval mode; ``sae.metadata`` holds what was saved with it (site, cache,
    training summary) or the foreign config.
    """
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not path.is_dir():
        raise SAEFormatError(f"SAE folder {path} does not exist or is not a directory")
    if not cfg_path.is_file():
        raise SAEFormatError(f"{path} is not an SAE folder: {CONFIG_NAME} is missing")
    cfg = _read_cfg(cfg_path)
    if cfg.get("format") == FORMAT:
        sae, tensors = _ours(cfg, _weights(path / WEIGHTS_NAME), path)
    elif (path / WEIGHTS_NAME).is_file():
        sae, tensors = sparsify_to_ours(cfg, _weights(path / WEIGHTS_NAME), path)
    elif (path / SAELENS_WEIGHTS_NAME).is_file():
        sae, tensors = saelens_to_ours(cfg, _weights(path / SAELENS_WEIGHTS_NAME), path)
    else:
        raise SAEFormatError(f"{path} has {CONFIG_NAME} but neither {WEIGHTS_NAME} (ours, "
                             f"sparsify) nor {SAELENS_WEIGHTS_NAME} (SAELens)")
    _check_shapes(sae, tensors, path)
    try:
        sae.load_folded_state(tensors)
    except (ValueError, RuntimeError) as err:
        raise SAEFormatError(f"{path}: {err}") from err
    sae.metadata = cfg.get("metadata", cfg)
    return sae.to(device=device, dtype=dtype).eval()


def load_saes(root: str | Path, **kwargs) -> dict[str, SparseAutoencoder]:
    """Every SAE folder directly under ``root`` (``<root>/<site>/cfg.json``), by folder name."""
    root = Path(root)
    found = {p.parent.name: load_sae(p.parent, **kwargs) for p in sorted(root.glob(f"*/{CONFIG_NAME}"))}
    if not found:
        raise SAEFormatError(f"no SAE folders (*/{CONFIG_NAME}) under {root}")
    return found


def load_pretrained_sae(repo_id: str, sae_id: Optional[str] = None, *,
                        revision: Optional[str] = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
    """Download (or reuse from the local Hub cache) one SAE folder of a Hub repository and load
    it: ``sae_id`` is the folder (a SAELens release's SAE id such as
    ``blocks.8.hook_resid_pre``, or a sparsify hookpoint such as ``layers.6``); None means the
    repository root. Only that folder's files are fetched (``allow_patterns``)."""
    from huggingface_hub import snapshot_download

    folder = (sae_id or "").strip("/")
    patterns = [f"{folder}/{CONFIG_NAME}", f"{folder}/*.safetensors"] if folder else \
        [CONFIG_NAME, "*.safetensors"]
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, no access
        raise SAEFormatError(f"cannot fetch SAE {repo_id!r} (folder {folder or '.'!r}) from the "
                             f"Hugging Face Hub: {str(err).splitlines()[0] if str(err) else err}"
                             ) from err
    return load_sae(Path(root) / folder, device=device, dtype=dtype)


# ---------------------------------------------------------------------- readers
def _read_cfg(cfg_path: Path) -> dict:
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise SAEFormatError(f"{cfg_path} is not valid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{cfg_path} is not a JSON object")
    return cfg


def _weights(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise SAEFormatError(f"{file} is missing")
    try:
        return {k: v.to(torch.float32) for k, v in load_file(str(file)).items()}
    except (SafetensorError, OSError, ValueError) as err:
        raise SAEFormatError(f"{file} is not a readable safetensors file ({err}); it is "
                             "truncated or corrupt: export the SAE again") from err


def _ours(cfg: dict, tensors: dict, path: Path) -> tuple[SparseAutoencoder, dict]:
    config = dict(cfg.get("config") or {})
    kind = config.get("kind")
    claimed = {k: cfg[k] for k in ("architecture", "kind", "activation") if k in cfg}
    if kind not in SAE_CLASSES or any(v != kind for v in claimed.values()):
        raise SAEFormatError(f"{path / CONFIG_NAME}: architecture fields disagree or are unknown "
                             f"(config.kind={kind!r}, {claimed}); known: {', '.join(SAE_CLASSES)}")
    has_threshold = "threshold" in tensors
    if has_threshold != (kind in _THRESHOLD_KINDS):
        raise SAEFormatError(f"{path}: cfg.json says {kind!r} but the weights "
                             f"{'have' if has_threshold else 'lack'} a threshold tensor")
    missing = [n for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if n not in tensors]
    if missing or "d_in" not in cfg or "num_latents" not in cfg:
        raise SAEFormatError(f"{path}: incomplete SAE (missing {missing or 'd_in/num_latents'})")
    config["n_latents"] = cfg["num_latents"]
    sae = build_sae(sae_config(config), cfg["d_in"])
    out = {"W_enc": tensors.pop("encoder.weight"), "b_enc": tensors.pop("encoder.bias"),
           "W_dec": tensors.pop("W_dec"), "b_dec": tensors.pop("b_dec"), **tensors}
    return sae, out


def _check_shapes(sae: SparseAutoencoder, tensors: dict, path: Path) -> None:
    expected = {"W_enc": (sae.n_latents, sae.d_in), "b_enc": (sae.n_latents,),
                "W_dec": (sae.n_latents, sae.d_in), "b_dec": (sae.d_in,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise SAEFormatError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"expected {shape} for d_in={sae.d_in}, n_latents={sae.n_latents}")
