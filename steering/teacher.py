"""What a learned steer learns from: the model's own native answers, and the supports.

**Teacher answers.** For each discovery/tuning prompt that has a translation
(``sae_train/corpora/data/prompt_translations*.jsonl``), the unsteered model is asked in the
target language (translated prompt and template, :mod:`steering.native`) with the headline
decoding; the answer is kept only when the harness's own judge accepts it (ΔM > 0, head
identified as the target, fluent). The pair (English prompt, native answer) is one training
example. Answers are generated once and cached as JSON next to the artifacts, keyed by
everything that shapes them.

**Supports.** Which neurons a learned steer may move:
``traced``: FOXP2's N_t ∪ N_en at the given layers (the localisation's neuron tracing);
``random``: as many random neurons per layer (seeded); ``dense``: every neuron of the layers.
Each neuron's scale σ is its activation std on discovery text (English and target).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from sae_train.corpora.embedded import Prompt, load_prompt_translations
from sae_train.models.sites import site_module
from steering.defaultness import DEFAULT_TEMPLATE
from steering.learned import LearnedSteerError, Support, TeacherExample

log = logging.getLogger(__name__)

SUPPORTS = ("traced", "random", "dense")


def teacher_answers(model, tokenizer, prompts: Sequence[Prompt], *, target: str, english: str,
                    native_template: str, token_sets, settings, identifiers,
                    cache_file: Optional[Path] = None, model_key: str = ""
                    ) -> tuple[list[TeacherExample], dict]:
    """(examples, summary) for ``prompts`` (see the module docstring). ``settings`` is the
    harness's EvalSettings (decoding, length); its template is replaced by the native one."""
    import dataclasses

    from steering.evaluate import generate
    from steering.judge import judge_continuation

    translations = load_prompt_translations(target)
    kept = [p for p in prompts if p.id in translations]
    key = hashlib.sha256(json.dumps(
        {"model": model_key, "target": target, "template": native_template,
         "ids": [p.id for p in kept], "texts": [translations[p.id] for p in kept],
         "max_new_tokens": settings.max_new_tokens, "steps": settings.steps,
         "repetition_penalty": settings.repetition_penalty}, sort_keys=True).encode()
    ).hexdigest()[:16]
    if cache_file is not None and cache_file.is_file():
        stored = json.loads(cache_file.read_text())
        if stored.get("key") == key:
            return [TeacherExample(**e) for e in stored["examples"]], stored["summary"]
    if not kept:
        raise LearnedSteerError(f"no {target} translation of any of the {len(prompts)} "
                                "teacher prompts (prompt_translations*.jsonl)")
    native = dataclasses.replace(settings, template=native_template)
    gens = generate(model, tokenizer, [translations[p.id] for p in kept], None, token_sets,
                    target, english, native)
    examples, rejected = [], {}
    for p, new_ids, head, full, dm in zip(kept, gens.new_ids, gens.heads, gens.fulls,
                                          gens.delta_m):
        verdict = judge_continuation(head, full, target, identifiers, settings.guards)
        ok = dm > 0 and verdict.is_target_head and verdict.fluent and len(new_ids) > 0
        if not ok:
            reason = "delta_m" if dm <= 0 else (verdict.failed_guards or ["language"])[0]
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        prompt_ids = tokenizer(DEFAULT_TEMPLATE.format(prompt=p.text))["input_ids"]
        examples.append(TeacherExample(p.id, list(prompt_ids), list(new_ids)))
    summary = {"asked": len(kept), "kept": len(examples), "rejected": rejected,
               "seconds": gens.seconds,
               "examples": [{"prompt": p.text, "native_answer": f}
                            for p, f in list(zip(kept, gens.fulls))[:4]]}
    log.info("teacher answers (%s): %d of %d native answers kept %s", target, len(examples),
             len(kept), rejected)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps({"key": key, "summary": summary,
                                          "examples": [e.__dict__ for e in examples]}))
    return examples, summary


@torch.no_grad()
def neuron_scales(model, tokenizer, texts: Sequence[str], layers: Sequence[int],
                  batch_size: int = 16) -> dict[int, Tensor]:
    """Per layer, each MLP neuron's activation std over the tokens of ``texts`` (σ)."""
    from steering.defaultness import left_pad

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


def build_support(kind: str, loc, layers: Sequence[int], scales: dict[int, Tensor],
                  seed: int = 0) -> Support:
    """The ``kind`` support (module docstring) at ``layers`` of localisation ``loc``, with
    the FOXP2 contrast (μ_t − μ_en)/σ as the optional initial θ."""
    if kind not in SUPPORTS:
        raise LearnedSteerError(f"support={kind!r}; use one of {list(SUPPORTS)}")
    generator = torch.Generator().manual_seed(seed)
    index, scale, init = {}, {}, {}
    for layer in layers:
        traced = torch.cat([loc.t(layer, "target_neurons").long(),
                            loc.t(layer, "english_neurons").long()]).unique()
        width = loc.t(layer, "neuron_mu_target").numel()
        if kind == "traced":
            ids = traced
        elif kind == "random":
            ids = torch.randperm(width, generator=generator)[:traced.numel()].sort().values
        else:
            ids = torch.arange(width)
        if ids.numel() == 0:
            continue
        index[layer] = ids
        scale[layer] = scales[layer][ids].float()
        contrast = (loc.t(layer, "neuron_mu_target") - loc.t(layer, "neuron_mu_english"))[ids]
        init[layer] = contrast.float() / scale[layer]
    return Support(sorted(index), index, scale, init)
