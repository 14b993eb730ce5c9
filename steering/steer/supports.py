"""Which neurons a learned steer may move (the support), and their typical size σ.

``traced``: FOXP2's N_t ∪ N_en at the given layers (the localisation's neuron tracing), plus
``extra`` neurons per layer with the largest contrast |μ_t − μ_en|/σ among the others (0 by
default); ``random``: as many random neurons per layer (seeded); ``dense``: every neuron of the
layers.
Each neuron's scale σ is its activation std on discovery text (English and target), so one
learning rate and one L1 weight fit every layer (:mod:`steering.steer.learned`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from sae_train.models.sites import site_module
from steering.language.defaultness import left_pad
from steering.steer.learned import LearnedSteerError, Support
from steering.steer.localisation import Localisation

SUPPORTS = ("traced", "random", "dense")


@torch.no_grad()
def neuron_scales(model, tokenizer, texts: Sequence[str], layers: Sequence[int],
                  batch_size: int = 16) -> dict[int, Tensor]:
    """Per layer, each MLP neuron's activation std over the tokens of ``texts`` (σ)."""
    sums: dict[int, Tensor] = {}
    squares: dict[int, Tensor] = {}
    count = [0]
    handles = []
    mask_holder: dict[str, Tensor] = {}
    for layer in layers:
        module, _ = site_module(model, f"layers.{layer}.mlp")

        def hook(_m, args, layer=layer):
            x = args[0].float()
            keep = mask_holder["mask"].to(x.device).bool()
            rows = x[keep]
            sums[layer] = sums.get(layer, 0) + rows.sum(0)
            squares[layer] = squares.get(layer, 0) + (rows * rows).sum(0)
        handles.append(module.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        encoded = tokenizer(list(texts))["input_ids"]
        for start in range(0, len(encoded), batch_size):
            ids, attn = left_pad(encoded[start:start + batch_size], pad)
            mask_holder["mask"] = attn
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=ids.to(device), attention_mask=attn.to(device),
                  position_ids=pos.to(device), use_cache=False, logits_to_keep=1)
            count[0] += int(attn.sum())
    finally:
        for h in handles:
            h.remove()
    out = {}
    for layer in layers:
        mean = sums[layer] / count[0]
        var = (squares[layer] / count[0] - mean * mean).clamp_min(0)
        out[layer] = var.sqrt().clamp_min(1e-6).cpu()
    return out


def build_support(kind: str, loc: Localisation, layers: Sequence[int], scales: dict[int, Tensor],
                  seed: int = 0, extra: int = 0) -> Support:
    """The ``kind`` support (module docstring) at ``layers`` of localisation ``loc``, with
    the FOXP2 contrast (μ_t − μ_en)/σ as the optional initial θ."""
    if kind not in SUPPORTS:
        raise LearnedSteerError(f"support={kind!r}; use one of {list(SUPPORTS)}")
    if extra < 0:
        raise LearnedSteerError(f"extra={extra}: must be ≥ 0")
    generator = torch.Generator().manual_seed(seed)
    index, scale, init = {}, {}, {}
    for layer in layers:
        traced = torch.cat([loc.t(layer, "target_neurons").long(),
                            loc.t(layer, "english_neurons").long()]).unique()
        width = loc.t(layer, "neuron_mu_target").numel()
        contrast = (loc.t(layer, "neuron_mu_target") - loc.t(layer, "neuron_mu_english")
                    ).float() / scales[layer].float()
        if kind == "traced":
            ids = traced
            if extra:
                others = contrast.abs()
                others[traced] = -1.0  # never picked twice
                more = others.topk(min(extra, width - traced.numel())).indices
                ids = torch.cat([traced, more]).sort().values
        elif kind == "random":
            count = min(traced.numel() + extra, width)
            ids = torch.randperm(width, generator=generator)[:count].sort().values
        else:
            ids = torch.arange(width)
        if ids.numel() == 0:
            continue
        index[layer] = ids
        scale[layer] = scales[layer][ids].float()
        init[layer] = contrast[ids]
    return Support(sorted(index), index, scale, init)
