"""Site names resolve to the right modules on every supported family, and mistakes are explained."""

from __future__ import annotations

import pytest
import torch.nn as nn

from sae_train.models.sites import (SiteError, expand_site_patterns, resolve_sites, site_module)


def test_patterns_expand():
    assert expand_site_patterns("layers.*.resid", 3) == [
        "layers.0.resid", "layers.1.resid", "layers.2.resid"]
    assert expand_site_patterns(["layers.1-2.mlp", "layers.0,2.mlp_out", "layers.1.mlp"], 4) == [
        "layers.1.mlp", "layers.2.mlp", "layers.0.mlp_out", "layers.2.mlp_out"]


@pytest.mark.parametrize("arch,down", [("llama", "down_proj"), ("gemma3", "down_proj"),
                                       ("gpt2", "c_proj")])
def test_sites_map_to_modules(arch, down, load_tiny):
    model, _, _ = load_tiny(arch)
    sites = resolve_sites(model, ["layers.2.resid", "layers.2.mlp", "layers.2.mlp_out"])
    hidden = sites[0].width
    assert [s.width for s in sites] == [hidden, hidden * (2 if arch != "gpt2" else 4), hidden]
    layer_module, where = site_module(model, sites[0])
    assert where == "output" and type(layer_module).__name__.endswith(("DecoderLayer", "Block"))
    mlp_neurons, where = site_module(model, sites[1])
    assert where == "input" and mlp_neurons is getattr(layer_module.mlp, down)
    assert site_module(model, sites[2]) == (layer_module.mlp, "output")


def test_wrong_sites_list_what_exists(load_tiny):
    model, _, _ = load_tiny("llama")
    with pytest.raises(SiteError, match=r"'layers.40.resid' does not exist: the model has 4 "
                                        r"layers \(0–3\)"):
        resolve_sites(model, "layers.40.resid")
    with pytest.raises(SiteError, match="not a valid site name.*resid, mlp, mlp_out"):
        resolve_sites(model, "layers.1.attn")
    with pytest.raises(SiteError, match="not a valid site name"):
        resolve_sites(model, "blocks.1.resid")


def test_unsupported_architecture_lists_supported():
    class Config:
        model_type = "mamba"

    model = nn.Linear(2, 2)
    model.config = Config()
    with pytest.raises(SiteError, match="'mamba'.*not supported.*gemma3.*gpt2.*llama.*qwen2"):
        resolve_sites(model, "layers.0.resid")


def test_loaded_models_feed_the_lm_head_a_contiguous_input(load_tiny):
    """logits_to_keep=1 slices the hidden states; torch's CPU linear on that strided slice
    copies the whole head weight per row (30 s per batch on a 262k vocabulary). load_model adds
    a pre-hook that makes the input contiguous: same logits, the hook is there once."""
    import torch

    from sae_train.models.loading import contiguous_lm_head

    model, tokenizer, _ = load_tiny("gemma3")
    head = model.get_output_embeddings()
    assert getattr(head, "_foxp2_contiguous", False)
    assert contiguous_lm_head(model) is False  # idempotent
    seen = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    try:
        ids = tokenizer(["a b c", "a much longer prompt here"], return_tensors="pt",
                        padding=True)
        with torch.no_grad():
            last = model(**ids, logits_to_keep=1).logits[:, -1]
            full = model(**ids).logits[:, -1]
    finally:
        handle.remove()
    assert all(seen)
    torch.testing.assert_close(last, full)


def test_dtype_auto_follows_the_hardware():
    """auto → bf16 only where it is computed natively (emulated bf16 is several times slower
    than fp32 on AVX2-only CPUs); explicit names pass through; unknown names are refused."""
    import pytest
    import torch

    from sae_train.models.loading import cpu_has_native_bf16, resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == ("bfloat16" if cpu_has_native_bf16() else "float32")
    assert resolve_dtype("float16", cpu) == "float16"
    with pytest.raises(ValueError, match="auto"):
        resolve_dtype("fp8", cpu)


def test_resolve_precision_auto_follows_the_hardware(monkeypatch):
    """trainer.precision=auto: bf16-mixed where bf16 is native, 32-true elsewhere; other
    values pass through unchanged."""
    from sae_train.models import loading

    assert loading.resolve_precision("16-mixed", "cpu") == "16-mixed"
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert loading.resolve_precision("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert loading.resolve_precision("auto", "cpu") == "32-true"
