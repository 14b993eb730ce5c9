"""One layer's analysis (steps 3–5 of :mod:`steering.localise.run`), as named steps.

:func:`analyse_layer` reads a :class:`LayerInputs` (the same for every layer) and returns a
:class:`LayerResult`; each step takes what it needs, adds its part of the layer's record
(``localise/layers.json``) and returns a small dataclass: the SAE's weights → selectivity →
typical norm → lift and ranking → causal gain → top features → tracing → spectra.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae_train.cache.manifest import file_sha256
from steering.language.token_sets import LanguageTokenSets
from steering.localise.config import LocaliseAppConfig
from steering.localise.inputs import load_layer_sae
from steering.localise.ledger import Ledger, LocaliseError, digest, write_json
from steering.localise.lift import (FeatureRanking, direction_top_tokens, logit_mass_lift,
                                    rank_by_selectivity_and_lift, rank_features,
                                    typical_norm_from_cache, unit_rows)
from steering.localise.selectivity import (PairedCodes, Selectivity, paired_codes_from_cache,
                                           selectivity_from_cache)
from steering.localise.spectra import LayerSpectrum, difference_matrix, layer_spectrum
from steering.localise.tracing import NeuronTrace, TailRule, trace_resid_features

log = logging.getLogger("foxp2-localise")

RANK1_ALIGNMENT = 0.9  # rank 1 and ‖Pμ‖/‖μ‖ ≥ this: "essentially the mean"


def spectrum_support(ranking: FeatureRanking, min_support: int) -> Tensor:
    """S_ℓ: the K selected features, then further screened features in ranking order up to
    ``min_support`` columns."""
    size = max(ranking.k, min(min_support, len(ranking.feature_ids)))
    return ranking.feature_ids[:size].clone()


def support_spectrum(z_target: Tensor, z_english: Tensor, support: Tensor, *, layer: int,
                     cfg, seed: int) -> tuple[LayerSpectrum | None, Tensor, Tensor, list[str]]:
    """Spectrum of ΔZ on ``support`` with columns that never differ dropped (module doc).

    Returns (spectrum or None when ΔZ is all zero, the support actually used (original column
    ids), V_r (|S|, r), warnings).
    """
    warnings: list[str] = []
    alive = (z_target.double() - z_english.double()).abs().sum(0) > 0
    support = torch.as_tensor(support, dtype=torch.long).reshape(-1)
    used = support[alive[support]] if support.numel() else support
    if used.numel() < support.numel():
        warnings.append(f"layer {layer}: {support.numel() - used.numel()} of {support.numel()} "
                        "support columns never differ between target and English (dropped)")
    if used.numel() == 0:
        warnings.append(f"layer {layer}: the paired differences on the support are all zero; "
                        "no spectrum (Mass·Stab = 0)")
        return None, used, torch.zeros(used.numel(), 0), warnings
    columns = torch.nonzero(alive).flatten()
    local = torch.searchsorted(columns, used)
    zt, ze = z_target[:, columns], z_english[:, columns]
    kwargs = dict(layer=layer, rank=cfg.rank, max_gap_index=cfg.max_gap_index,
                  n_boot=cfg.n_boot, seed=seed, nulls=list(cfg.nulls), n_null=cfg.n_null,
                  null_boot=cfg.null_boot)
    try:
        spec = layer_spectrum(zt, ze, local, **kwargs)
    except ValueError as err:  # a null draw that is all zero
        warnings.append(f"layer {layer}: nulls failed ({err}); spectrum without nulls")
        spec = layer_spectrum(zt, ze, local, **{**kwargs, "nulls": []})
    delta = difference_matrix(zt, ze, local)
    _, _, vh = torch.linalg.svd(delta, full_matrices=False)
    basis = vh[: spec.rank].T.float().contiguous()
    return spec, used, basis, warnings


def spectrum_row(spec: LayerSpectrum | None) -> dict:
    if spec is None:
        return {"rank": None, "eigengap_index": None, "eigengap_ratio": None, "r_eff": None,
                "mass": 0.0, "stability": 0.0, "mass_stab": 0.0, "mean_alignment": None,
                "support_size": 0, "essentially_rank1": None}
    return {"rank": spec.rank, "eigengap_index": spec.eigengap_index,
            "eigengap_ratio": spec.eigengap_ratio, "r_eff": spec.r_eff, "mass": spec.mass,
            "stability": spec.stability, "mass_stab": spec.mass_stab,
            "mean_alignment": spec.mean_alignment, "support_size": spec.support_size,
            "essentially_rank1": bool(spec.rank == 1 and spec.mean_alignment >= RANK1_ALIGNMENT),
            "nulls": {k: {"mass_stab": v.mass_stab, "mass": v.mass, "stability": v.stability}
                      for k, v in spec.nulls.items()}}


@dataclass
class LayerResult:
    layer: int
    site: str
    record: dict
    selectivity: Selectivity
    codes: PairedCodes
    ranking: FeatureRanking
    scale: float
    mean_direction: Tensor
    trace: NeuronTrace | None
    act_means: tuple[Tensor, Tensor]
    spectrum: LayerSpectrum | None
    support: Tensor
    basis: Tensor
    neuron_spectrum: LayerSpectrum | None
    decoder: Tensor
    encoder: Tensor
    causal_gain: float | None
    top_features: list[dict]
    encoder_bias: Tensor  # (n_latents,) effective bias of the pre-activations on raw h
    english_ids: Tensor  # most English-selective latents (Sel < 0)


def empty_ranking(warning: str) -> FeatureRanking:
    empty = torch.zeros(0)
    ranking = rank_features(torch.zeros(0, dtype=torch.long), empty, empty)
    ranking.warnings.append(warning)
    return ranking


def lift_key(cfg: LocaliseAppConfig, info, sae_sha: str, sets_digest: str, prompts: list[str],
              candidates: Tensor, scale: float) -> str:
    lift = dataclasses.asdict(cfg.lift)
    return digest({"model": info.fingerprint, "dtype": info.dtype, "sae": sae_sha,
                    "sets": sets_digest, "prompts": prompts, "lift": lift,
                    "defaultness": dataclasses.asdict(cfg.defaultness),
                    "candidates": candidates.tolist(), "scale": scale, "target": cfg.target,
                    "english": cfg.english})


def selectivity_on_cpu(sel: Selectivity) -> Selectivity:
    return dataclasses.replace(sel, **{f: getattr(sel, f).cpu() for f in
                                       ("sel", "mean_target", "mean_english", "std_target",
                                        "std_english")})


@dataclass
class LayerInputs:
    """What every layer's analysis reads (the same for every layer of one run)."""

    cfg: LocaliseAppConfig
    cache: Any
    model: Any
    tokenizer: Any
    info: Any
    sets: LanguageTokenSets
    sets_digest: str
    lift_prompts: list
    baseline: Tensor  # the lift prompts' unsteered ΔM
    neuron_acts: dict | None  # {layer: (target, english)} when the model path traced them
    ledger: Ledger
    tokenizer_digest: str
    work_dir: Path

    @property
    def device(self):
        return next(self.model.parameters()).device

    def lift_kwargs(self) -> dict:
        dc = self.cfg.defaultness
        return dict(english=self.cfg.english, steps=dc.steps, batch_size=self.cfg.lift.batch_size,
                    template=dc.template, baseline=self.baseline)


@dataclass
class LayerSae:
    """The layer's SAE and its weights on the CPU (pre-activations on raw h:
    h·encoderᵀ + encoder_bias)."""

    sae: Any
    sha256: str | None
    decoder: Tensor
    encoder: Tensor
    encoder_bias: Tensor


@dataclass
class LiftOutcome:
    """The ranking by Sel and lift, and the stored lift (``resume``) it may come from."""

    ranking: FeatureRanking
    candidates: Tensor
    cached: dict | None
    key: str
    work_file: Path


@dataclass
class CausalGain:
    mean_direction: Tensor
    gain: float | None
    record: dict | None


@dataclass
class Tracing:
    trace: NeuronTrace | None
    act_target: Tensor
    act_english: Tensor


@dataclass
class Spectra:
    spectrum: LayerSpectrum | None
    support: Tensor
    basis: Tensor
    neuron_spectrum: LayerSpectrum | None


def analyse_layer(layer: int, sae_path: Path, inputs: LayerInputs) -> LayerResult:
    """Steps 3–5 (up to the window) for one layer; see :mod:`steering.localise.run`."""
    site = f"layers.{layer}.resid"
    rec: dict[str, Any] = {"layer": layer, "site": site, "sae": str(sae_path), "warnings": []}
    sae = load_sae_weights(inputs, layer, site, sae_path, rec)
    sel, codes = measure_selectivity(inputs, layer, site, sae, rec)
    with inputs.ledger.step("typical_norm", rec):
        scale = typical_norm_from_cache(inputs.cache, site, inputs.cfg.selectivity.splits,
                                        max_tokens=inputs.cfg.lift.norm_tokens,
                                        seed=inputs.cfg.seed)
    rec["typical_norm"] = scale
    lift = rank_by_lift(inputs, layer, site, sae, sel, scale, sae_path, rec)
    causal = single_layer_causal_gain(inputs, layer, site, sae, lift, scale, rec)
    top_features = top_features_with_tokens(inputs, sae, lift.ranking, rec)
    tracing = trace_to_neurons(inputs, layer, site, sae, lift.ranking, codes, rec)
    spectra = difference_spectra(inputs, layer, lift.ranking, codes, tracing, rec)
    for w in rec["warnings"]:
        log.warning(w)
    return LayerResult(layer, site, rec, sel, codes, lift.ranking, scale, causal.mean_direction,
                       tracing.trace, (tracing.act_target.mean(0), tracing.act_english.mean(0)),
                       spectra.spectrum, spectra.support, spectra.basis,
                       spectra.neuron_spectrum, sae.decoder, sae.encoder, causal.gain,
                       top_features, sae.encoder_bias,
                       sel.english_top(inputs.cfg.selectivity.n_english))


def load_sae_weights(inputs: LayerInputs, layer: int, site: str, sae_path: Path,
                     rec: dict) -> LayerSae:
    """The layer's SAE, checked against the cache's width, the site and the tokenizer."""
    with inputs.ledger.step("load_sae", rec):
        sae = load_layer_sae(sae_path, site, inputs.cache.width(site), inputs.tokenizer_digest,
                             inputs.device)
        sae_sha = file_sha256(sae_path / "sae.safetensors") \
            if (sae_path / "sae.safetensors").is_file() else None
    rec.update(n_latents=sae.n_latents, sae_kind=sae.config.kind, sae_sha256=sae_sha)
    encoder = sae.encoder_weight.detach().float().cpu()
    # Pre-activations of the saved (scale-folded) SAE: (h − b_dec)·W_encᵀ + b_enc.
    encoder_bias = (sae.b_enc.detach().float().cpu() - encoder @ sae.b_dec.detach().float().cpu())
    return LayerSae(sae, sae_sha, sae.W_dec.detach().float().cpu(), encoder, encoder_bias)


def measure_selectivity(inputs: LayerInputs, layer: int, site: str, sae: LayerSae,
                        rec: dict) -> tuple[Selectivity, PairedCodes]:
    """3a. Sel of every latent on the discovery pairs, both variants (one ranks)."""
    cfg, sc = inputs.cfg, inputs.cfg.selectivity
    other = "mean" if sc.reduction == "last" else "last"
    with inputs.ledger.step("selectivity", rec):
        sel, codes = selectivity_from_cache(inputs.cache, site, sae.sae.encode, cfg.target,
                                            cfg.english, sc.splits, sc.reduction, sc.eps,
                                            sc.chunk_tokens, inputs.device)
        sel_other, _ = selectivity_from_cache(inputs.cache, site, sae.sae.encode, cfg.target,
                                              cfg.english, sc.splits, other, sc.eps,
                                              sc.chunk_tokens, inputs.device)
    sel, codes.target, codes.english = selectivity_on_cpu(sel), codes.target.cpu(), \
        codes.english.cpu()
    sel_other = selectivity_on_cpu(sel_other)
    top_m = cfg.lift.top_m
    a, b = set(sel.top(top_m).tolist()), set(sel_other.top(top_m).tolist())
    rec["selectivity"] = {sc.reduction: sel.to_dict(top=20), other: sel_other.to_dict(top=20),
                          "ranking_variant": sc.reduction,
                          f"top_{top_m}_overlap": len(a & b) / max(1, len(a | b))}
    log.info("[layer %d] selectivity on %d pairs: %d of %d latents with Sel > 0 (max %.3f; "
             "%s variant max %.3f)", layer, codes.n_pairs, int((sel.sel > 0).sum()),
             sae.sae.n_latents, float(sel.sel.max()), other, float(sel_other.sel.max()))
    return sel, codes


def stored_lift(inputs: LayerInputs, layer: int, work_file: Path, key: str) -> dict | None:
    """The layer's stored lift and causal gain (``resume``) when their key is unchanged."""
    if not (inputs.cfg.resume and work_file.is_file()):
        return None
    stored = json.loads(work_file.read_text())
    if stored.get("key") == key:
        log.info("[layer %d] resume: lift and causal gain from %s", layer, work_file)
        return stored
    log.info("[layer %d] resume: %s is stale (inputs or settings changed); recomputing",
             layer, work_file)
    return None


def rank_by_lift(inputs: LayerInputs, layer: int, site: str, sae: LayerSae, sel: Selectivity,
                 scale: float, sae_path: Path, rec: dict) -> LiftOutcome:
    """3b. The top-M latents by Sel verified by their logit-mass lift; ranking and K."""
    cfg, lc = inputs.cfg, inputs.cfg.lift
    candidates = torch.sort(sel.sel, descending=True, stable=True).indices
    candidates = candidates[sel.sel[candidates] > 0][:lc.top_m]
    key = lift_key(cfg, inputs.info, sae.sha256 or str(sae_path), inputs.sets_digest,
                   [p.text for p in inputs.lift_prompts], candidates, scale)
    work_file = inputs.work_dir / f"layer_{layer}.json"
    cached = stored_lift(inputs, layer, work_file, key)
    with inputs.ledger.step("lift", rec):
        if len(candidates) == 0:
            ranking = empty_ranking(f"layer {layer}: no latent has Sel > 0; nothing to verify")
        elif cached is not None:
            slope = torch.tensor(cached["lift"]["slope"], dtype=torch.float32)
            ranking = rank_features(candidates, sel.sel[candidates], slope, lc.saturation,
                                    lc.min_k, lc.max_k)
            rec["lift"] = cached["lift"]
        else:
            ranking, lift = rank_by_selectivity_and_lift(
                inputs.model, inputs.tokenizer, inputs.lift_prompts, inputs.sets, cfg.target,
                site, sel.sel, sae.decoder, scale, top_m=lc.top_m, alphas=list(lc.alphas),
                saturation=lc.saturation, min_k=lc.min_k, max_k=lc.max_k,
                **inputs.lift_kwargs())
            rec["lift"] = lift.to_dict()
    rec["ranking"] = ranking.to_dict()
    rec["k"] = ranking.k
    rec["warnings"] += ranking.warnings
    log.info("[layer %d] lift of %d candidates on %d prompts: K = %d (best score %.4g)", layer,
             len(candidates), len(inputs.lift_prompts), ranking.k,
             float(ranking.score[0]) if len(ranking.score) else float("nan"))
    return LiftOutcome(ranking, candidates, cached, key, work_file)


def causal_push(ranking: FeatureRanking, decoder: Tensor, causal_gain: str
                ) -> tuple[Tensor, str | None, Tensor | None]:
    """The unit mean of the K selected decoder rows, and the direction the causal gain pushes
    (that mean, or the best-ranked row) with its description (None: nothing to push)."""
    k = ranking.k
    mean_direction = torch.zeros(decoder.shape[1])
    if k > 0:
        mean_direction = unit_rows(decoder[ranking.selected]).mean(0)
        norm = float(mean_direction.norm())
        mean_direction = mean_direction / norm if norm > 0 else torch.zeros_like(mean_direction)
    if k > 0 and causal_gain == "mean_direction" and float(mean_direction.norm()) > 0:
        return mean_direction, f"mean_direction of the top-{k} features", mean_direction
    if len(ranking.feature_ids):
        kind = "top_feature" if k > 0 else "top_feature (K = 0: best-ranked screened feature)"
        return mean_direction, kind, unit_rows(decoder[ranking.feature_ids[:1]])[0]
    return mean_direction, None, None


def single_layer_causal_gain(inputs: LayerInputs, layer: int, site: str, sae: LayerSae,
                             lift: LiftOutcome, scale: float, rec: dict) -> CausalGain:
    """3c. The ΔM lift of one push at this layer alone (stored with the lift for ``resume``)."""
    cfg, lc, cached = inputs.cfg, inputs.cfg.lift, lift.cached
    mean_direction, kind, push = causal_push(lift.ranking, sae.decoder, lc.causal_gain)
    alpha = lc.causal_alpha if lc.causal_alpha is not None else max(lc.alphas, key=abs)
    causal_gain = None
    with inputs.ledger.step("causal_gain", rec):
        if push is not None and cached is not None and cached.get("causal") is not None:
            causal = cached["causal"]
            causal_gain = causal["gain"]
        elif push is not None:
            res = logit_mass_lift(inputs.model, inputs.tokenizer, inputs.lift_prompts,
                                  inputs.sets, cfg.target, site, push[None], [alpha], scale,
                                  **inputs.lift_kwargs())
            causal_gain = float(res.lift[0, 0])
            causal = {"gain": causal_gain, "alpha": alpha, "direction": kind,
                      "delta_m_mean": float(res.delta_m.mean()), "cost": res.cost}
        else:
            causal = None
    rec["causal_gain"] = causal
    log.info("[layer %d] single-layer causal gain (%s, α=%g): %s", layer, kind, alpha,
             "n/a" if causal_gain is None else f"{causal_gain:+.4f}")
    if cached is None and rec.get("lift") is not None:
        write_json(lift.work_file, {"key": lift.key, "lift": rec["lift"], "causal": causal})
    return CausalGain(mean_direction, causal_gain, causal)


def top_features_with_tokens(inputs: LayerInputs, sae: LayerSae, ranking: FeatureRanking,
                             rec: dict) -> list[dict]:
    """The best-ranked features with their top tokens (logit lens of the decoder rows)."""
    lc = inputs.cfg.lift
    with inputs.ledger.step("top_tokens", rec):
        n_top = min(lc.n_top_features, len(ranking.feature_ids))
        top_ids = ranking.feature_ids[:n_top]
        tokens = direction_top_tokens(inputs.model, inputs.tokenizer, sae.decoder[top_ids],
                                      k=lc.n_top_tokens) if n_top else []
    top_features = [{"feature": int(f), "selected": i < ranking.k,
                     "sel": float(ranking.selectivity[i]), "slope": float(ranking.slope[i]),
                     "score": float(ranking.score[i]),
                     "top_tokens": [t for _, t, _ in tokens[i]]}
                    for i, f in enumerate(top_ids.tolist())]
    rec["top_features"] = top_features
    return top_features


def pair_neuron_activations(inputs: LayerInputs, layer: int, site: str, codes: PairedCodes
                            ) -> tuple[Tensor, Tensor]:
    """Per-sentence MLP activations of the discovery pairs: the cache's, or the model's."""
    if inputs.neuron_acts is not None:
        return inputs.neuron_acts[layer]
    cfg, sc = inputs.cfg, inputs.cfg.selectivity
    nc = paired_codes_from_cache(inputs.cache, f"layers.{layer}.mlp", cfg.target, cfg.english,
                                 sc.splits, cfg.tracing.reduction, None, sc.chunk_tokens)
    if not np.array_equal(nc.pair_ids, codes.pair_ids):
        raise LocaliseError(f"layers.{layer}.mlp and {site} hold different pairs in the "
                            f"cache at {inputs.cache.path}")
    return nc.target.float(), nc.english.float()


def trace_to_neurons(inputs: LayerInputs, layer: int, site: str, sae: LayerSae,
                     ranking: FeatureRanking, codes: PairedCodes, rec: dict) -> Tracing:
    """4. The K selected features traced to the MLP neurons of the layer (N_t, N_en)."""
    tc, k = inputs.cfg.tracing, ranking.k
    with inputs.ledger.step("tracing", rec):
        act_t, act_en = pair_neuron_activations(inputs, layer, site, codes)
        rule = TailRule(tc.z_min, tc.max_fraction, tc.max_size, tc.t_min)
        trace = None
        if k > 0:
            trace = trace_resid_features(inputs.model, layer, sae.encoder[ranking.selected],
                                         act_t, act_en, feature_weights=ranking.score[:k],
                                         rule=rule, feature_ids=ranking.selected.tolist(),
                                         fold_post_norm=tc.fold_post_norm)
    rec["trace"] = trace.to_dict() if trace is not None else None
    n_t = 0 if trace is None else int(trace.target_neurons.numel())
    n_en = 0 if trace is None else int(trace.english_neurons.numel())
    log.info("[layer %d] tracing (%s): |N_t| = %d, |N_en| = %d of %d neurons", layer,
             "cache" if inputs.neuron_acts is None else "model", n_t, n_en, act_t.shape[1])
    return Tracing(trace, act_t, act_en)


def difference_spectra(inputs: LayerInputs, layer: int, ranking: FeatureRanking,
                       codes: PairedCodes, tracing: Tracing, rec: dict) -> Spectra:
    """5. Spectra of the paired differences on the SAE support and on N_t ∪ N_en."""
    cfg, trace = inputs.cfg, tracing.trace
    with inputs.ledger.step("spectra", rec):
        support = spectrum_support(ranking, cfg.spectra.min_support)
        spec, used, basis, warns = support_spectrum(codes.target, codes.english, support,
                                                    layer=layer, cfg=cfg.spectra,
                                                    seed=cfg.seed + 1000 * layer)
        rec["warnings"] += warns
        neuron_spec = None
        n_traced = 0 if trace is None else \
            int(trace.target_neurons.numel()) + int(trace.english_neurons.numel())
        if trace is not None and n_traced >= 2:
            nsup = torch.cat([trace.target_neurons, trace.english_neurons])
            neuron_spec, _, _, nwarns = support_spectrum(tracing.act_target,
                                                         tracing.act_english, nsup, layer=layer,
                                                         cfg=cfg.spectra,
                                                         seed=cfg.seed + 1000 * layer + 7)
            rec["warnings"] += [f"neurons: {w}" for w in nwarns]
    rec["spectrum"] = spec.to_dict() if spec is not None else None
    rec["support"] = used.tolist()
    rec["neuron_spectrum"] = neuron_spec.to_dict() if neuron_spec is not None else None
    if spec is not None:
        log.info("[layer %d] spectrum on %d latents: rank %d (gap %.2f), r_eff %.2f, Mass %.3f, "
                 "Stab %.3f, ‖Pμ‖/‖μ‖ %.3f", layer, spec.support_size, spec.rank,
                 spec.eigengap_ratio, spec.r_eff, spec.mass, spec.stability,
                 spec.mean_alignment)
    return Spectra(spec, used, basis, neuron_spec)
