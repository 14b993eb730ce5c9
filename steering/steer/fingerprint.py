"""The model fingerprint a steering artifact carries, and the check that a model matches it.

A steer's tensors are in one model's units and index its layers, neurons and vocabulary: used on
another model they either crash deep in a hook (a width mismatch) or, worse, run and steer
nonsense (same widths, other weights' meaning). :func:`model_fingerprint` is cheap (config
fields, no weight reads): ``model_type``, ``architecture`` (the model class), ``n_layers``,
``hidden_size``, ``mlp_width``, ``vocab_size`` and, when a tokenizer is given, ``tokenizer``
(a hash of its vocabulary and special tokens: :func:`sae_train.models.loading.tokenizer_hash`).
:func:`fingerprint_mismatches` names the fields that differ (``architecture`` is recorded, not
compared: the same weights may be loaded through another class).
"""

from __future__ import annotations

COMPARED = ("model_type", "n_layers", "hidden_size", "mlp_width", "vocab_size", "tokenizer")


def _first(cfg, *names):
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return None


def model_fingerprint(model, tokenizer=None) -> dict:
    """The fingerprint of ``model`` (and ``tokenizer``): see the module docstring."""
    from sae_train.models.loading import tokenizer_hash
    from sae_train.models.sites import text_config

    config = model.config
    tcfg = text_config(model)
    hidden = _first(tcfg, "hidden_size", "n_embd", "d_model")
    mlp = _first(tcfg, "intermediate_size", "n_inner", "ffn_dim")
    if mlp is None and hidden is not None and _first(tcfg, "n_embd") is not None:
        mlp = 4 * int(hidden)  # GPT-2: n_inner=None means 4·n_embd
    out = {"model_type": str(getattr(config, "model_type", "") or ""),
           "architecture": type(model).__name__,
           "n_layers": _int(_first(tcfg, "num_hidden_layers", "n_layer", "num_layers")),
           "hidden_size": _int(hidden), "mlp_width": _int(mlp),
           "vocab_size": _int(_first(tcfg, "vocab_size") or _first(config, "vocab_size"))}
    if tokenizer is not None:
        out["tokenizer"] = tokenizer_hash(tokenizer)
    return out


def _int(value):
    return None if value is None else int(value)


def fingerprint_mismatches(stored: dict, current: dict) -> list[str]:
    """``["hidden_size: artifact 64, model 32", ...]`` over the compared fields both have."""
    return [f"{k}: artifact {stored[k]!r}, model {current[k]!r}" for k in COMPARED
            if stored.get(k) is not None and current.get(k) is not None
            and stored[k] != current[k]]
