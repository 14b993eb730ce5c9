"""Neuron tracing: from ranked SAE features to the MLP neurons that drive them (item 5).

**Features on ``layers.{i}.resid``.** MLP neuron n of the same layer writes
``a_n(x) · W_down[:, n]`` into the residual stream; its contribution to feature j's
pre-activation (encoder direction e_j, a row of ``W_enc``) is::

    c_{j,n}(x) = a_n(x) · ⟨W_down[:, n], e_j⟩ = a_n(x) · w_{j,n}

with ``a_n`` the ``layers.{i}.mlp`` activations (the down projection's input). Neurons are
ranked by ``score_{j,n} = E_tgt[c_{j,n}] − E_en[c_{j,n}] = w_{j,n} · (E_tgt[a_n] − E_en[a_n])``
over parallel pairs (per-sentence activations, see :mod:`steering.localise.selectivity`). For
several features the scores are summed with ``feature_weights`` (default 1 each; e.g. their ranking
scores). Gemma's ``post_feedforward_layernorm`` sits between the MLP and the residual: its
per-channel scale (1 + weight) is folded into W_down (:func:`neuron_write_matrix`); its per-token
1/RMS factor is positive and shared by all neurons of a token, so it is left out.

**Features on ``layers.{i}.mlp``.** The SAE's input *is* the neuron vector, so w_{j,n} is the
encoder weight itself (W_down replaced by the identity). With activations the same contrast is
used; without them the summed encoder weights are the score ("top weights").

**Tail rule** (:class:`TailRule`, :func:`tail_neurons`). Robust z of the summed score over the
layer's neurons, ``z_n = (score_n − median) / (1.4826 · MAD)`` (the standard deviation if the
MAD is 0). N_t = neurons with score > 0 and z ≥ ``z_min`` (default 4), the largest scores
first, at most ``max(1, ceil(max_fraction · n_neurons))`` (default 1 %) and ``max_size`` if set;
N_en likewise from the negative side (score < 0, z ≤ −``z_min``). When per-pair activations
are given, a neuron must also differ significantly between the languages: the paired
t-statistic of a_n(x_t,k) − a_n(x_en,k) over the pairs needs |t| ≥ ``t_min`` (default 3); the
z score alone would admit a neuron whose large weight multiplies a pure sampling difference.
A z threshold alone would let a heavy-tailed layer pour hundreds of neurons in; a fraction
alone would always pick something, even from pure noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from sae_train.models.sites import architecture_layout, decoder_layers


# --------------------------------------------------------------------------- weights
@torch.no_grad()
def neuron_write_matrix(model, layer: int, fold_post_norm: bool = True) -> Tensor:
    """The columns neurons write into the residual stream: ``(d_model, n_neurons)`` float32.

    Llama-style ``down_proj`` (a Linear, weight (d_model, n)) and GPT-2's ``c_proj`` (a Conv1D,
    weight (n, d_model)) both come out as (d_model, n). ``fold_post_norm`` multiplies row i by
    the channel scale of a post-MLP norm (Gemma's ``post_feedforward_layernorm``).
    """
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} does not exist: the model has {len(layers)} layers "
                         f"(0–{len(layers) - 1})")
    layout = architecture_layout(model)
    block = layers[layer]
    down = getattr(getattr(block, layout.mlp), layout.down_proj)
    weight = down.weight.detach().float()
    if type(down).__name__ == "Conv1D":  # GPT-2: y = x @ W, W (n_in, n_out)
        weight = weight.T
    weight = weight.clone()
    norm = getattr(block, "post_feedforward_layernorm", None)
    if fold_post_norm and norm is not None and getattr(norm, "weight", None) is not None:
        scale = norm.weight.detach().float()
        scale = 1.0 + scale if type(norm).__name__.startswith("Gemma") else scale
        weight *= scale[:, None].to(weight.device)
    return weight


def feature_neuron_weights(encoder_dirs: Tensor, write_matrix: Tensor) -> Tensor:
    """w_{j,n} = ⟨W_down[:, n], e_j⟩: (K, d_model) @ (d_model, n_neurons) → (K, n_neurons)."""
    if encoder_dirs.ndim == 1:
        encoder_dirs = encoder_dirs[None]
    if encoder_dirs.shape[-1] != write_matrix.shape[0]:
        raise ValueError(f"encoder directions have width {encoder_dirs.shape[-1]} but the write "
                         f"matrix is {tuple(write_matrix.shape)} (d_model, n_neurons)")
    return encoder_dirs.float().to(write_matrix.device) @ write_matrix.float()


# --------------------------------------------------------------------------- tails
@dataclass(frozen=True)
class TailRule:
    """Which neurons form the tails of a score (see the module doc)."""

    z_min: float = 4.0
    max_fraction: float = 0.01
    max_size: int | None = None
    t_min: float = 3.0

    def __post_init__(self):
        if self.z_min <= 0 or not 0 < self.max_fraction <= 1 or self.t_min < 0:
            raise ValueError(f"TailRule needs z_min > 0, 0 < max_fraction ≤ 1 and t_min ≥ 0; "
                             f"got {self.z_min}, {self.max_fraction}, {self.t_min}")
        if self.max_size is not None and self.max_size < 1:
            raise ValueError(f"TailRule.max_size must be ≥ 1 or None; got {self.max_size}")

    def cap(self, n_neurons: int) -> int:
        cap = max(1, math.ceil(self.max_fraction * n_neurons))
        return cap if self.max_size is None else min(cap, self.max_size)


def robust_z(score: Tensor) -> Tensor:
    """(score − median) / (1.4826 · MAD), falling back to the std; zeros if both are 0."""
    s = score.double()
    centred = s - s.median()
    spread = 1.4826 * centred.abs().median()
    if spread <= 0:
        spread = s.std(correction=0) if s.numel() > 1 else torch.zeros((), dtype=s.dtype)
    if spread <= 0:
        return torch.zeros_like(score, dtype=torch.float32)
    return (centred / spread).float()


def paired_t(act_target: Tensor, act_english: Tensor) -> Tensor:
    """Paired t-statistic per column of (n_pairs, n) activations (0 where undefined)."""
    d = act_target.double() - act_english.double()
    if d.shape[0] < 2:
        raise ValueError("a paired t-statistic needs at least 2 pairs")
    se = d.std(0, correction=1) / math.sqrt(d.shape[0])
    mean = d.mean(0)
    t = torch.where(se > 0, mean / torch.where(se > 0, se, torch.ones_like(se)),
                    torch.where(mean != 0, mean.sign() * math.inf, torch.zeros_like(mean)))
    return t.float()


def tail_neurons(score: Tensor, rule: TailRule = TailRule(), t: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(positive tail, negative tail, z) of a (n_neurons,) score; tails ordered by |score|.
    ``t``: per-neuron paired t of the activation difference (filter |t| ≥ rule.t_min)."""
    score = score.detach().float().cpu()
    z = robust_z(score)
    cap = rule.cap(score.numel())
    ok = torch.ones_like(score, dtype=torch.bool) if t is None else t.cpu().abs() >= rule.t_min
    order = torch.sort(score, descending=True, stable=True).indices
    pos = order[(score[order] > 0) & (z[order] >= rule.z_min) & ok[order]][:cap]
    order = torch.sort(score, descending=False, stable=True).indices
    neg = order[(score[order] < 0) & (z[order] <= -rule.z_min) & ok[order]][:cap]
    return pos, neg, z


# --------------------------------------------------------------------------- tracing
@dataclass
class NeuronTrace:
    """Traced neurons of one layer: N_t (positive tail) and N_en (negative tail)."""

    layer: int | None
    feature_ids: list[int]
    per_feature: Tensor  # (K, n_neurons) score_{j,n}
    score: Tensor  # (n_neurons,) weighted sum over features
    z: Tensor  # (n_neurons,) robust z of ``score``
    target_neurons: Tensor  # N_t, long, largest score first
    english_neurons: Tensor  # N_en, long, most negative first
    rule: TailRule = field(default_factory=TailRule)
    source: str = "resid"
    t: Tensor | None = None  # (n_neurons,) paired t of the activation difference, if per-pair

    def to_dict(self, top: int = 20) -> dict:
        order = torch.sort(self.score.abs(), descending=True, stable=True).indices[:top]
        return {
            "layer": self.layer, "source": self.source, "feature_ids": self.feature_ids,
            "rule": asdict(self.rule), "n_neurons": int(self.score.numel()),
            "target_neurons": self.target_neurons.tolist(),
            "english_neurons": self.english_neurons.tolist(),
            "top": [{"neuron": int(n), "score": float(self.score[n]), "z": float(self.z[n]),
                     "t": None if self.t is None else float(self.t[n])}
                    for n in order.tolist()],
        }


def _mean_difference(act_target: Tensor, act_english: Tensor) -> Tensor:
    """E_tgt[a] − E_en[a] from (n_pairs, n) per-sentence activations (or (n,) means)."""
    if act_target.shape != act_english.shape or act_target.ndim not in (1, 2):
        raise ValueError(f"target and English activations must have the same (n_pairs, "
                         f"n_neurons) or (n_neurons,) shape; got {tuple(act_target.shape)} and "
                         f"{tuple(act_english.shape)}")
    if act_target.ndim == 2:
        return act_target.double().mean(0) - act_english.double().mean(0)
    return act_target.double() - act_english.double()


def trace_neurons(weights: Tensor, act_target: Tensor, act_english: Tensor,
                  feature_weights: Tensor | Sequence[float] | None = None,
                  rule: TailRule = TailRule(), *, layer: int | None = None,
                  feature_ids: Sequence[int] | None = None, source: str = "resid") -> NeuronTrace:
    """Rank neurons by E_tgt[c] − E_en[c] with c_{j,n} = a_n · w_{j,n} and take the tails.

    ``weights``: (K, n_neurons) w_{j,n} (:func:`feature_neuron_weights`, or encoder rows for an
    ``mlp`` SAE). ``act_target``/``act_english``: per-sentence neuron activations of the pairs,
    (n_pairs, n_neurons) — then the paired-t filter applies — or their means (n_neurons,).
    ``feature_weights``: (K,) weights of the per-feature scores in the sum (default ones).
    """
    if weights.ndim == 1:
        weights = weights[None]
    diff = _mean_difference(act_target, act_english).to(weights.device)
    if diff.numel() != weights.shape[1]:
        raise ValueError(f"{weights.shape[1]} neuron weights per feature but activations of "
                         f"{diff.numel()} neurons")
    per_feature = (weights.double() * diff[None]).float().cpu()
    fw = (torch.ones(len(per_feature)) if feature_weights is None
          else torch.as_tensor(feature_weights, dtype=torch.float32).reshape(-1))
    if len(fw) != len(per_feature):
        raise ValueError(f"{len(fw)} feature weights for {len(per_feature)} features")
    score = (fw[:, None].double() * per_feature.double()).sum(0).float()
    t = paired_t(act_target, act_english) if act_target.ndim == 2 else None
    pos, neg, z = tail_neurons(score, rule, t)
    ids = list(range(len(per_feature))) if feature_ids is None else [int(i) for i in feature_ids]
    return NeuronTrace(layer, ids, per_feature, score, z, pos, neg, rule, source, t)


def trace_resid_features(model, layer: int, encoder_dirs: Tensor, act_target: Tensor,
                         act_english: Tensor, feature_weights=None,
                         rule: TailRule = TailRule(), feature_ids: Sequence[int] | None = None,
                         fold_post_norm: bool = True) -> NeuronTrace:
    """Trace ``layers.{layer}.resid`` features (encoder rows ``encoder_dirs``, (K, d_model)) to
    the MLP neurons of the same layer, with activations from ``layers.{layer}.mlp``."""
    weights = feature_neuron_weights(encoder_dirs, neuron_write_matrix(model, layer,
                                                                       fold_post_norm))
    return trace_neurons(weights, act_target, act_english, feature_weights, rule, layer=layer,
                         feature_ids=feature_ids, source="resid")


def trace_mlp_features(encoder_rows: Tensor, act_target: Tensor | None = None,
                       act_english: Tensor | None = None, feature_weights=None,
                       rule: TailRule = TailRule(), *, layer: int | None = None,
                       feature_ids: Sequence[int] | None = None) -> NeuronTrace:
    """Neurons of features of an SAE trained on ``layers.{i}.mlp``: ``encoder_rows`` (K,
    n_neurons) are the w_{j,n}. With activations: the same target−English contrast; without:
    the (weighted) encoder weights themselves are the score (N_en then means the neurons that
    most suppress the target features)."""
    if encoder_rows.ndim == 1:
        encoder_rows = encoder_rows[None]
    if (act_target is None) != (act_english is None):
        raise ValueError("give both act_target and act_english, or neither")
    if act_target is None:
        ones = torch.ones(encoder_rows.shape[1])
        trace = trace_neurons(encoder_rows, ones, torch.zeros_like(ones), feature_weights, rule,
                              layer=layer, feature_ids=feature_ids, source="mlp-weights")
        return trace
    return trace_neurons(encoder_rows, act_target, act_english, feature_weights, rule,
                         layer=layer, feature_ids=feature_ids, source="mlp")


# --------------------------------------------------------------------------- overlap
def neuron_overlap(a: Tensor | Sequence[int], b: Tensor | Sequence[int]) -> dict:
    """Counts and Jaccard of two neuron sets (Jaccard of two empty sets is reported as 0)."""
    sa = set(torch.as_tensor(a, dtype=torch.long).reshape(-1).tolist())
    sb = set(torch.as_tensor(b, dtype=torch.long).reshape(-1).tolist())
    inter, union = len(sa & sb), len(sa | sb)
    return {"n_a": len(sa), "n_b": len(sb), "intersection": inter, "union": union,
            "jaccard": inter / union if union else 0.0, "common": sorted(sa & sb)}


def lape_overlap(traced: Mapping[int, Tensor | Sequence[int]],
                 lape: Mapping[int, Tensor | Sequence[int]]) -> dict:
    """Per-layer and total overlap of traced neuron sets with LAPE sets ``{layer: neurons}``
    (e.g. ``lape_neurons(...)[lang]``); layers missing on one side count as empty."""
    layers = sorted(set(traced) | set(lape))
    per_layer = {int(l): neuron_overlap(traced.get(l, []), lape.get(l, [])) for l in layers}
    total_a = sum(v["n_a"] for v in per_layer.values())
    total_b = sum(v["n_b"] for v in per_layer.values())
    inter = sum(v["intersection"] for v in per_layer.values())
    union = sum(v["union"] for v in per_layer.values())
    return {"per_layer": per_layer,
            "total": {"n_traced": total_a, "n_lape": total_b, "intersection": inter,
                      "union": union, "jaccard": inter / union if union else 0.0}}
