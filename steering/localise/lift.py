"""Logit-mass lift by real intervention, and the feature ranking (Neural FOXP2 item 4).

**The edit.** For a feature j with decoder direction d_j (unit norm: rows are normalised unless
``normalize=False``) at site ℓ, the delta edit is::

    h ← h + α · s_ℓ · d_j

at the site's module (``layers.{i}.resid``: the decoder layer's *output*, the very place whose
activations the SAE was trained on; ``mlp``: the down projection's input; ``mlp_out``: the MLP's
output). ``s_ℓ`` is the layer's typical activation norm (the median token L2 norm, see
:func:`median_token_norm`), so α is a *relative* push: residual norms grow by orders of
magnitude with depth (≈130 → 34,000 in Gemma-3-270m) and an absolute α would mean nothing.
The edit is added at **every position**: all prompt positions (padding included; padded keys
are masked out anyway) and each of the T greedy steps (with the KV cache, a step's forward sees
only its new token, which is edited too).

**Lift.** With ΔM from :func:`steering.language.defaultness.defaultness` on neutral English
prompts x::

    Lift_j(α)   = E_x[ΔM(x; do(h += α s_ℓ d_j)) − ΔM(x)]
    LiftSlope_j = median over the α grid of Lift_j(α) / α      (the middle-two mean if even)

**Batching and cost.** Every (α, feature, prompt) triple is one row: the prompts are replicated
|α|·F times and each row carries its own edit vector, so one generation serves up to
``batch_size`` rows of any mix of features and strengths. With P prompts, F features, |α|
strengths, batch size B and T steps::

    generations    = ceil(P / B)               (the unedited baseline, skipped if given)
                   + ceil(|α| · F · P / B)      (the edited rows)
    forward passes = T × generations            (the prompt pass + T − 1 cached one-token steps)

(at most |α| · ceil(F · P / B) edited generations, fewer when rows of different α share a batch).
Each row's ΔM does not depend on which rows share its batch (left padding with position ids, as
in :mod:`steering.language.defaultness`), which the tests check against one feature at a time.

**Ranking.** Score_j = max(Sel_j, 0) · max(LiftSlope_j, 0). Screen: the ``top_m`` latents by
Sel (Sel > 0 only); verify: lift of those; rank by Score. **K rule** (:func:`saturation_k`): sort
the scores in descending order, cumulative gain G_k = Σ_{i≤k} score_i / Σ score; K is the
smallest k with G_k ≥ ``saturation`` (default 0.9), then clipped to [``min_k``, ``max_k``]
(defaults 1, 32) and never past the last positive score; no positive score gives K = 0 and a
warning (nothing is selected silently).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from sae_train.models.sites import decoder_layers, first_tensor, resolve_sites, site_module
from steering.language.defaultness import (DEFAULT_TEMPLATE, DefaultnessResult, defaultness,
                                           encode_prompts, left_pad, pad_token_id)
from steering.language.token_sets import LanguageTokenSets

log = logging.getLogger(__name__)

DEFAULT_ALPHAS = (0.125, 0.25, 0.5)


# --------------------------------------------------------------------------- typical norms
def median_token_norm(activations: Tensor) -> float:
    """s_ℓ: the median L2 norm of the rows of ``activations`` (n_tokens, width)."""
    if activations.ndim != 2 or activations.shape[0] == 0:
        raise ValueError(f"activations must be a non-empty (n_tokens, width) matrix; got "
                         f"{tuple(activations.shape)}")
    return float(activations.float().norm(dim=-1).median())


def typical_norm_from_cache(cache, site: str, splits: Sequence[str] | None = ("discovery",),
                            languages: Sequence[str] | None = None, max_tokens: int = 65536,
                            seed: int = 0) -> float:
    """Median token norm of a cache site over (at most ``max_tokens``, seeded sample of) rows."""
    idx = cache.select(None if splits is None else list(splits),
                       None if languages is None else list(languages))
    if len(idx) == 0:
        raise ValueError(f"no cached tokens in splits {splits} / languages {languages} at "
                         f"{cache.path}")
    if len(idx) > max_tokens:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_tokens, replace=False))
    return median_token_norm(cache.gather(site, idx))


@torch.no_grad()
def typical_norm_from_model(model, tokenizer, texts: Sequence[str], site: str,
                            batch_size: int = 16, max_length: int = 128) -> float:
    """Median token norm at ``site`` over the text tokens of ``texts`` (special tokens and
    padding excluded), by running the model with a hook."""
    module, where = site_module(model, site)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)) or [-1])
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    norms, state = [], {}

    def grab(x: Tensor) -> None:
        norms.append(x.float().norm(dim=-1)[state["keep"]].cpu())

    if where == "output":
        handle = module.register_forward_hook(lambda _m, _i, out: grab(first_tensor(out)))
    else:
        handle = module.register_forward_pre_hook(lambda _m, args: grab(args[0]))
    try:
        encoded = tokenizer(list(texts), add_special_tokens=True, truncation=True,
                            max_length=max_length)["input_ids"]
        for start in range(0, len(encoded), batch_size):
            ids, attn = left_pad(encoded[start:start + batch_size], pad_id)
            state["keep"] = (attn.bool() & ~torch.isin(ids, special)).to(device)
            model(input_ids=ids.to(device), attention_mask=attn.to(device),
                  position_ids=(attn.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=False)
    finally:
        handle.remove()
    flat = torch.cat(norms) if norms else torch.zeros(0)
    if flat.numel() == 0:
        raise ValueError("no text tokens in the given texts")
    return float(flat.median())


# --------------------------------------------------------------------------- the edit
@contextmanager
def site_delta_edit(model, site: str, vectors: Tensor):
    """Context manager: ``h ← h + v`` at every position of ``site`` while inside.

    ``vectors``: ``(width,)`` for every row, or ``(batch, width)`` with one vector per batch row
    (the batch must then have exactly that many rows). Decoder layers may return a tensor or a
    tuple; both are handled. The hook is removed on exit, also when the body raises.
    """
    module, where = site_module(model, site)
    vectors = vectors.detach()
    if vectors.ndim not in (1, 2):
        raise ValueError(f"edit vectors must be (width,) or (batch, width); got "
                         f"{tuple(vectors.shape)}")
    cached: dict = {}

    def add(x: Tensor) -> Tensor:
        if x.shape[-1] != vectors.shape[-1]:
            raise ValueError(f"edit vectors have width {vectors.shape[-1]} but {site} has width "
                             f"{x.shape[-1]}")
        key = (x.device, x.dtype)
        if key not in cached:
            cached[key] = vectors.to(device=x.device, dtype=x.dtype)
        v = cached[key]
        if v.ndim == 2:
            if v.shape[0] != x.shape[0]:
                raise ValueError(f"{v.shape[0]} per-row edit vectors for a batch of "
                                 f"{x.shape[0]} rows at {site}")
            v = v.reshape(v.shape[0], *([1] * (x.ndim - 2)), v.shape[-1])
        return x + v

    if where == "output":
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                return type(output)([add(output[0]), *output[1:]])
            return add(output)
        handle = module.register_forward_hook(hook)
    else:
        def pre_hook(_module, args):
            return (add(args[0]), *args[1:])
        handle = module.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


class RowScheduledEdit:
    """A ``defaultness(intervention=…)`` callable that edits row r with its own vector.

    Rows are the prompts as passed to ``defaultness``; call i (batch i) edits rows
    ``[i·B, (i+1)·B)`` with ``vector_of(rows) → (len(rows), width)``, built lazily per batch
    (the full (rows, width) matrix never exists). :meth:`check_finished` verifies that every
    row was edited exactly once.
    """

    def __init__(self, model, site: str, n_rows: int, batch_size: int, vector_of):
        self.model, self.site, self.n_rows, self.batch_size = model, site, n_rows, batch_size
        self.vector_of = vector_of
        self.calls = 0

    def __call__(self):
        start = self.calls * self.batch_size
        if start >= self.n_rows:
            raise RuntimeError(f"edit schedule exhausted: {self.n_rows} rows in batches of "
                               f"{self.batch_size} were already used")
        self.calls += 1
        rows = torch.arange(start, min(start + self.batch_size, self.n_rows))
        return site_delta_edit(self.model, self.site, self.vector_of(rows))

    def check_finished(self) -> None:
        expected = math.ceil(self.n_rows / self.batch_size)
        if self.calls != expected:
            raise RuntimeError(f"the edit schedule was entered {self.calls} times for "
                               f"{expected} batches: rows and edits are misaligned")


@contextmanager
def shared_prompt_edit(model, site: str, rows_of: Tensor, vectors: Tensor):
    """Context manager for one generation whose R rows share P < R prompts (the lift's rows:
    every feature × α on the same prompts), editing row r with ``vectors[r]`` at a decoder
    layer's output (``layers.{i}.resid``).

    The prompt pass runs the P distinct prompts through layers 0…i once; at layer i's output
    the batch fans out into the R rows (row r: prompt ``rows_of[r]`` plus its edit) and the
    layers above run on R rows, their masks and position embeddings widened to match; then the
    KV cache of layers 0…i is widened to R rows. Each later pass (one new token per row) edits
    every row as :func:`site_delta_edit` does. Below the edit every row of a prompt computes
    the same numbers, so this is the edited generation with the repeated work left out (the
    tests compare it with :func:`site_delta_edit` row by row). Use with
    ``greedy_language_masses(..., rows_of=rows_of)``, which widens its own inputs after the
    prompt pass.
    """
    from steering.language.defaultness import _returned_cache

    (resolved,) = resolve_sites(model, site)
    if resolved.kind != "resid":
        raise ValueError(f"a shared prompt pass needs a decoder layer's output (resid); got "
                         f"{site}")
    layers = decoder_layers(model)
    index = resolved.layer
    vectors, rows_of = vectors.detach(), torch.as_tensor(rows_of, dtype=torch.long)
    if vectors.ndim != 2 or len(vectors) != len(rows_of):
        raise ValueError(f"need one edit vector per row: {tuple(vectors.shape)} for "
                         f"{len(rows_of)} rows")
    state: dict = {"prompt_pass": True, "n_prompts": None}

    def fan_out(value):
        if isinstance(value, Tensor) and value.ndim >= 2 and value.shape[0] == state["n_prompts"]:
            return value.index_select(0, rows_of.to(value.device))
        if isinstance(value, tuple):
            return tuple(fan_out(v) for v in value)
        return value

    def at_site(_module, _inputs, output):
        h = first_tensor(output)
        if state["prompt_pass"]:
            state["n_prompts"] = h.shape[0]
            h = h.index_select(0, rows_of.to(h.device))
        if h.shape[0] != len(vectors):
            raise ValueError(f"{len(vectors)} edit rows for a batch of {h.shape[0]} at {site}")
        h = h + vectors.to(device=h.device, dtype=h.dtype)[:, None, :]
        if isinstance(output, (tuple, list)):
            return type(output)([h, *output[1:]])
        return h

    def widen(_module, args, kwargs):
        if not state["prompt_pass"]:
            return None
        return args, {k: fan_out(v) for k, v in kwargs.items()}

    def after_prompt_pass(_module, _inputs, output):
        if not state["prompt_pass"]:
            return
        cache = _returned_cache(output)
        per_layer = getattr(cache, "layers", None)
        if per_layer is None or len(per_layer) <= index:
            raise RuntimeError(f"{type(cache).__name__} has no per-layer storage to widen; "
                               "use site_delta_edit")
        for layer_cache in per_layer[:index + 1]:
            layer_cache.reorder_cache(rows_of.to(layer_cache.keys.device))
        state["prompt_pass"] = False

    handles = [layers[index].register_forward_hook(at_site)]
    handles += [layer.register_forward_pre_hook(widen, with_kwargs=True)
                for layer in layers[index + 1:]]
    handles.append(model.register_forward_hook(after_prompt_pass))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def shares_prompt_pass(model, site: str) -> bool:
    """Whether :func:`shared_prompt_edit` applies: a resid site of a model whose KV cache
    keeps per-layer storage (transformers' DynamicCache)."""
    (resolved,) = resolve_sites(model, site)
    if resolved.kind != "resid":
        return False
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - transformers always has it
        return False
    return hasattr(DynamicCache(config=model.config), "layers")


def edited_rows_delta_m(model, tokenizer, prompts: Sequence, row_prompts: Sequence[int],
                        vector_of, site: str, token_sets: LanguageTokenSets, target: str, *,
                        english: str = "en", steps: int = 3, batch_size: int = 16,
                        template: str = DEFAULT_TEMPLATE) -> Tensor:
    """ΔM of each row r (prompt ``prompts[row_prompts[r]]``, edit ``vector_of(rows)``) with
    :func:`shared_prompt_edit`: each batch's prompt pass runs only its distinct prompts. Rows
    of the same prompt should be adjacent (a batch then holds a few prompts)."""
    from steering.language.defaultness import greedy_language_masses

    _, encoded = encode_prompts(tokenizer, prompts, template)
    device = next(model.parameters()).device
    set_ids = [token_sets.id_tensor(target, device), token_sets.id_tensor(english, device)]
    pad_id = pad_token_id(tokenizer)
    row_prompts = torch.as_tensor(list(row_prompts), dtype=torch.long)
    out = []
    for start in range(0, len(row_prompts), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(row_prompts)))
        distinct, rows_of = torch.unique(row_prompts[rows], return_inverse=True)
        ids, attention = left_pad([encoded[i] for i in distinct.tolist()], pad_id)
        with shared_prompt_edit(model, site, rows_of, vector_of(rows)):
            masses, _ = greedy_language_masses(model, ids.to(device), attention.to(device),
                                               set_ids, steps, rows_of=rows_of)
        out.append((masses[0] - masses[1]).mean(-1))
    return torch.cat(out)


# --------------------------------------------------------------------------- lift
def lift_cost(n_prompts: int, n_features: int, n_alphas: int, batch_size: int, steps: int = 3,
              baseline: bool = True) -> dict:
    """Generations and forward passes of :func:`logit_mass_lift` (formula in the module doc)."""
    base = math.ceil(n_prompts / batch_size) if baseline else 0
    edited = math.ceil(n_alphas * n_features * n_prompts / batch_size)
    return {"generations": base + edited, "baseline_generations": base,
            "edited_generations": edited, "forward_passes": steps * (base + edited),
            "rows": n_alphas * n_features * n_prompts}


@dataclass
class LiftResult:
    """Lift of F features over an α grid on P prompts."""

    feature_ids: Tensor  # (F,) long
    alphas: Tensor  # (A,) float32, relative to ``scale``
    scale: float  # s_ℓ
    lift: Tensor  # (F, A) float32: E_x[ΔM(x; do) − ΔM(x)]
    slope: Tensor  # (F,) float32: median_α lift/α
    delta_m: Tensor  # (A, F, P) float32: ΔM under each edit
    baseline: Tensor  # (P,) float32: ΔM unedited
    site: str = "?"
    target: str = "?"
    steps: int = 3
    cost: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "site": self.site, "target": self.target, "steps": self.steps, "scale": self.scale,
            "alphas": self.alphas.tolist(), "feature_ids": self.feature_ids.tolist(),
            "lift": self.lift.tolist(), "slope": self.slope.tolist(),
            "baseline_mean_delta_m": float(self.baseline.mean()),
            "cost": self.cost, "seconds": self.seconds,
        }


def unit_rows(directions: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (a zero row is an error: it has no direction)."""
    norms = directions.float().norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise ValueError(f"direction rows {torch.flatnonzero(norms[:, 0] == 0)[:5].tolist()} "
                         "are zero")
    return directions.float() / norms


def logit_mass_lift(model, tokenizer, prompts: Sequence, token_sets: LanguageTokenSets,
                    target: str, site: str, directions: Tensor,
                    alphas: Sequence[float] = DEFAULT_ALPHAS, scale: float = 1.0, *,
                    feature_ids: Sequence[int] | Tensor | None = None, english: str = "en",
                    steps: int = 3, batch_size: int = 16, template: str = DEFAULT_TEMPLATE,
                    normalize: bool = True,
                    baseline: DefaultnessResult | Tensor | None = None,
                    share_prompt_pass: bool = True) -> LiftResult:
    """Lift_j(α) and LiftSlope_j of each direction by real intervention (see the module doc).

    ``directions``: (F, width) decoder rows of the candidate features at ``site``
    (``feature_ids`` names them, default 0…F−1). ``scale``: s_ℓ, the site's typical norm.
    ``baseline``: ΔM of the same prompts without edit, if already computed (else computed).
    ``share_prompt_pass``: at a resid site, each batch's prompt pass runs the layers below the
    edit once per distinct prompt (:func:`shared_prompt_edit`; false: once per row).
    Cost: :func:`lift_cost` generations of ``steps`` forward passes.
    """
    started = time.perf_counter()
    (resolved,) = resolve_sites(model, site)
    directions = directions.detach().float().cpu()
    if directions.ndim != 2 or directions.shape[1] != resolved.width:
        raise ValueError(f"directions must be (n_features, {resolved.width}) for {site}; got "
                         f"{tuple(directions.shape)}")
    if directions.shape[0] == 0:
        raise ValueError("no directions given")
    dirs = unit_rows(directions) if normalize else directions
    alpha = torch.as_tensor(list(alphas), dtype=torch.float32)
    if alpha.numel() == 0 or not torch.isfinite(alpha).all() or (alpha == 0).any():
        raise ValueError(f"alphas must be finite and non-zero (the slope divides by α); got "
                         f"{alpha.tolist()}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale (the site's typical norm) must be > 0; got {scale}")
    ids = (torch.arange(len(dirs)) if feature_ids is None
           else torch.as_tensor(feature_ids, dtype=torch.long).reshape(-1))
    if len(ids) != len(dirs):
        raise ValueError(f"{len(ids)} feature ids for {len(dirs)} directions")
    prompts = list(prompts)
    n_p, n_f, n_a = len(prompts), len(dirs), len(alpha)
    kwargs = dict(english=english, steps=steps, batch_size=batch_size, template=template)
    if baseline is None:
        base = defaultness(model, tokenizer, prompts, token_sets, target, **kwargs).delta_m
    else:
        base = baseline.delta_m if isinstance(baseline, DefaultnessResult) else baseline
        base = base.float().cpu()
        if base.shape != (n_p,):
            raise ValueError(f"baseline has shape {tuple(base.shape)} for {n_p} prompts")
    pushes = alpha * float(scale)
    # Rows go prompt by prompt, shortest prompt first: a batch then holds two or three prompts
    # of similar length instead of all of them, so little of it is left padding.
    lengths = [len(ids) for ids in encode_prompts(tokenizer, prompts, template)[1]]
    order = sorted(range(n_p), key=lambda i: lengths[i])
    per_prompt = n_a * n_f

    def vector_of(rows: Tensor) -> Tensor:  # row = q·(A·F) + a·F + f, prompt order[q]
        a, f = (rows % per_prompt) // n_f, rows % n_f
        return pushes[a][:, None] * dirs[f]

    row_prompts = [i for i in order for _ in range(per_prompt)]
    if share_prompt_pass and shares_prompt_pass(model, site):
        edited = edited_rows_delta_m(model, tokenizer, prompts, row_prompts, vector_of, site,
                                     token_sets, target, **kwargs)
    else:
        schedule = RowScheduledEdit(model, site, n_a * n_f * n_p, batch_size, vector_of)
        edited = defaultness(model, tokenizer, [prompts[i] for i in row_prompts], token_sets,
                             target, intervention=schedule, **kwargs).delta_m
        schedule.check_finished()
    by_row = edited.float().reshape(n_p, n_a, n_f)  # (sorted prompt, α, feature)
    delta_m = torch.empty(n_a, n_f, n_p)
    delta_m[:, :, torch.as_tensor(order)] = by_row.permute(1, 2, 0)
    lift = (delta_m - base[None, None, :]).mean(-1).T.contiguous()  # (F, A)
    slope = torch.quantile(lift / alpha[None, :], 0.5, dim=1)
    cost = lift_cost(n_p, n_f, n_a, batch_size, steps, baseline=baseline is None)
    result = LiftResult(ids, alpha, float(scale), lift, slope, delta_m, base, site=site,
                        target=target, steps=steps, cost=cost,
                        seconds=time.perf_counter() - started)
    log.info("lift of %d features × %d α on %d prompts at %s: %d generations, %.1fs", n_f, n_a,
             n_p, site, cost["generations"], result.seconds)
    return result


# --------------------------------------------------------------------------- ranking
def screen_by_selectivity(selectivity: Tensor, top_m: int = 64, min_sel: float = 0.0) -> Tensor:
    """The ``top_m`` latents with the largest Sel among those with Sel > ``min_sel``
    (descending Sel, ties by index)."""
    if top_m < 1:
        raise ValueError(f"top_m must be ≥ 1 (got {top_m})")
    sel = selectivity.detach().float().cpu()
    order = torch.sort(sel, descending=True, stable=True).indices
    order = order[sel[order] > min_sel]
    return order[:top_m]


def feature_scores(selectivity: Tensor, slope: Tensor) -> Tensor:
    """Score_j = max(Sel_j, 0) · max(LiftSlope_j, 0)."""
    return selectivity.float().clamp(min=0) * slope.float().clamp(min=0)


def saturation_k(sorted_scores: Tensor, saturation: float = 0.9, min_k: int = 1,
                 max_k: int = 32) -> int:
    """K for scores sorted in descending order (rule in the module doc); 0 if none positive."""
    if not 0 < saturation <= 1:
        raise ValueError(f"saturation must be in (0, 1]; got {saturation}")
    if min_k < 0 or max_k < max(min_k, 1):
        raise ValueError(f"need 0 ≤ min_k ≤ max_k and max_k ≥ 1; got {min_k}, {max_k}")
    s = sorted_scores.double().clamp(min=0)
    if len(s) > 1 and (s[1:] > s[:-1]).any():
        raise ValueError("scores must be sorted in descending order")
    n_positive = int((s > 0).sum())
    if n_positive == 0:
        return 0
    gain = s.cumsum(0) / s.sum()
    k = int(torch.searchsorted(gain, torch.tensor([saturation - 1e-12], dtype=gain.dtype))) + 1
    return int(min(max(k, min_k), max_k, n_positive))


@dataclass
class FeatureRanking:
    """Screened features ordered by Score (descending; ties by Sel then id); first K selected."""

    feature_ids: Tensor  # (n,) long
    selectivity: Tensor  # (n,) float32
    slope: Tensor  # (n,) float32
    score: Tensor  # (n,) float32
    cumulative_gain: Tensor  # (n,) float32 (zeros if no score is positive)
    k: int
    rule: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def selected(self) -> Tensor:
        return self.feature_ids[: self.k]

    def to_dict(self) -> dict:
        return {
            "k": self.k, "selected": self.selected.tolist(), "rule": self.rule,
            "warnings": self.warnings,
            "features": [{"feature": int(f), "sel": float(s), "slope": float(l),
                          "score": float(sc), "cumulative_gain": float(g)}
                         for f, s, l, sc, g in zip(self.feature_ids, self.selectivity,
                                                   self.slope, self.score,
                                                   self.cumulative_gain)],
        }


def rank_features(feature_ids: Sequence[int] | Tensor, selectivity: Tensor, slope: Tensor,
                  saturation: float = 0.9, min_k: int = 1, max_k: int = 32) -> FeatureRanking:
    """Rank candidates by Score and choose K by cumulative-gain saturation.

    ``feature_ids``, ``selectivity``, ``slope``: (n,) aligned (Sel and LiftSlope of each
    candidate).
    """
    ids = torch.as_tensor(feature_ids, dtype=torch.long).reshape(-1)
    sel, slope = selectivity.float().cpu().reshape(-1), slope.float().cpu().reshape(-1)
    if not len(ids) == len(sel) == len(slope):
        raise ValueError(f"{len(ids)} ids, {len(sel)} selectivities and {len(slope)} slopes")
    score = feature_scores(sel, slope)
    # Descending score, then descending Sel, then ascending id: a deterministic order.
    order = np.lexsort((ids.numpy(), -sel.double().numpy(), -score.double().numpy()))
    order = torch.from_numpy(order)
    ids, sel, slope, score = ids[order], sel[order], slope[order], score[order]
    k = saturation_k(score, saturation, min_k, max_k)
    total = float(score.clamp(min=0).double().sum())
    gain = (score.double().cumsum(0) / total).float() if total > 0 else torch.zeros_like(score)
    warnings = []
    if k == 0:
        warnings.append(f"no candidate has a positive score (of {len(ids)}: "
                        f"{int((sel > 0).sum())} with Sel > 0, {int((slope > 0).sum())} with "
                        "LiftSlope > 0); K = 0, nothing selected")
        log.warning(warnings[-1])
    rule = {"score": "max(sel,0)*max(slope,0)", "saturation": saturation, "min_k": min_k,
            "max_k": max_k}
    return FeatureRanking(ids, sel, slope, score, gain, k, rule, warnings)


def rank_by_selectivity_and_lift(model, tokenizer, prompts: Sequence,
                                 token_sets: LanguageTokenSets, target: str, site: str,
                                 selectivity: Tensor, decoder: Tensor, scale: float, *,
                                 top_m: int = 64, alphas: Sequence[float] = DEFAULT_ALPHAS,
                                 saturation: float = 0.9, min_k: int = 1, max_k: int = 32,
                                 **lift_kwargs) -> tuple[FeatureRanking, LiftResult]:
    """Screen the ``top_m`` latents by Sel, verify them by lift, rank by Score, choose K.

    ``selectivity``: (n_latents,); ``decoder``: (n_latents, width) = ``W_dec`` (rows are the
    directions). Extra keyword arguments go to :func:`logit_mass_lift`.
    """
    if decoder.ndim != 2 or decoder.shape[0] != selectivity.numel():
        raise ValueError(f"decoder must be (n_latents={selectivity.numel()}, width); got "
                         f"{tuple(decoder.shape)}")
    candidates = screen_by_selectivity(selectivity, top_m)
    if len(candidates) == 0:
        raise ValueError(f"no latent at {site} has Sel > 0: nothing to verify")
    lift = logit_mass_lift(model, tokenizer, prompts, token_sets, target, site,
                           decoder.detach()[candidates], alphas, scale,
                           feature_ids=candidates, **lift_kwargs)
    ranking = rank_features(candidates, selectivity.detach().float().cpu()[candidates],
                            lift.slope, saturation, min_k, max_k)
    return ranking, lift


# --------------------------------------------------------------------------- top tokens
def _final_norm_scale(model) -> Tensor | None:
    """The final norm's per-channel scale (Gemma's RMSNorm multiplies by 1 + weight)."""
    decoder_layers(model)  # an unsupported architecture fails here, naming the supported ones
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    norm = getattr(base, "norm", None) or getattr(base, "ln_f", None)
    weight = getattr(norm, "weight", None)
    if weight is None:
        return None
    weight = weight.detach().float()
    return 1.0 + weight if type(norm).__name__.startswith("Gemma") else weight


@torch.no_grad()
def direction_top_tokens(model, tokenizer, directions: Tensor, k: int = 8
                         ) -> list[list[tuple[int, str, float]]]:
    """Logit lens of residual directions: per row of ``directions`` (F, d_model), the ``k``
    tokens whose unembedding (with the final norm's channel scale folded in) it raises most,
    as (id, decoded text, logit contribution)."""
    unembed = model.get_output_embeddings().weight.detach().float()
    dirs = directions.detach().float().to(unembed.device)
    scale = _final_norm_scale(model)
    if scale is not None:
        dirs = dirs * scale.to(unembed.device)
    logits = dirs @ unembed.T  # (F, vocab)
    values, ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return [[(int(i), tokenizer.decode([int(i)]), float(v)) for i, v in zip(row_i, row_v)]
            for row_i, row_v in zip(ids.cpu(), values.cpu())]
