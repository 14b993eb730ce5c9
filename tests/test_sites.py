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
