"""Neural FOXP2 stages I–II for one target language, as a list of named steps.

:func:`run_localise` glues the pieces of ``steering.localise`` into the pipeline that
``foxp2-localise`` (:mod:`steering.apps.localise_app`) runs; settings are
:class:`steering.localise.config.LocaliseAppConfig`. Each step below is one function of this
module (one layer's steps 3–5: :mod:`steering.localise.layer`).
Everything is measured on the **discovery** split (cache pairs, corpus texts, neutral prompts);
the tuning and evaluation splits are never read here.

Pipeline
--------
0. **Inputs.** Open the cache; check that ``target`` and ``english`` have discovery pairs; the
   analysed layers are those with a cached ``layers.{i}.resid`` site and an SAE at
   ``<sae_dir>/layers.{i}.resid`` (or ``layers``, each of which must have both). SAE widths,
   the SAE's site and tokenizer, and the cache's tokenizer are checked against the model
   (a tokenizer mismatch is an error, a weights-fingerprint mismatch a warning: a cache made in
   bf16 and a model loaded in fp32 differ only by dtype).
1. **Token sets** V_t, V_en from the texts of the cache's discovery documents (every language
   present competes; ``token_sets.paired_only`` keeps parallel documents only).
2. **Baseline ΔM** on the embedded neutral prompts of the discovery split (T greedy steps).
3. **Per layer ℓ**: SAE codes of the cached activations of the discovery pairs → Sel (the
   ``selectivity.reduction`` variant ranks; the other variant is logged); typical norm s_ℓ
   (median token norm of the cached site); lift of the top-M by Sel on a seeded subset of the
   baseline prompts (the baseline's ΔM of those prompts is reused); ranking by Score and K.
   **Single-layer causal gain** of ℓ = E_x[ΔM(x; do(h_ℓ += α s_ℓ u)) − ΔM(x)] on the same
   prompts, with u the normalised mean of the K selected unit decoder rows
   (``lift.causal_gain=mean_direction``; ``top_feature``: the best-ranked row; with K = 0 the
   best-ranked screened row is used and the record says so) and α = ``lift.causal_alpha``
   (default: the largest α of the grid).
4. **Tracing** of the K selected features (weighted by their Score) to the MLP neurons of the
   same layer: per-sentence ``layers.{ℓ}.mlp`` activations of the same pairs from the cache, or,
   when the cache lacks that site (``tracing.source=auto``) or when asked (``model``), from the
   model run with hooks on the pair documents (windowed and special tokens dropped exactly as the
   cache writer does; ``tracing_source`` in the summary says which path ran). LAPE activation
   probabilities from the same source (all cache languages, the analysed layers together) and
   the overlap of N_t / N_en with LAPE's target / English neurons.
5. **Spectra** of the paired differences of SAE codes on the support S_ℓ = the K selected
   features, extended to ``spectra.min_support`` columns by the next verified features in ranking
   order (a 1-column ΔZ is rank 1 with Mass = Stab = 1 by construction). Latents that differ on
   no pair add no singular value and are dropped first, so the random-support null draws among
   latents that do differ (a draw of dead latents would be an all-zero ΔZ). The traced neurons
   N_t ∪ N_en get the same analysis on neuron activations (when ≥ 2). Window: contiguous
   ``window.min_width``–``max_width`` layers maximising mean Mass·Stab
   (steering.localise.window), each
   candidate logged with its layers' causal gains.

Outputs (``out_dir``)
---------------------
``localise/token_sets.json``
    :meth:`LanguageTokenSets.to_json` with ``include_ids=True``: reload with
    ``LanguageTokenSets.from_json``.
``localise/summary.json``  (``format: "foxp2-localise"``, ``format_version: 1``)
    ``target``, ``english``; ``window`` (``layers``, ``start``, ``end``, ``score``,
    ``flagged``, ``warnings``, ``rule``, ``mass_stab``, ``causal_gain``, ``candidates``);
    ``baseline`` (prompts, mean ΔM); ``layers``: ``{"ℓ": {k, n_target_neurons,
    n_english_neurons, rank, eigengap_index, eigengap_ratio, r_eff, mass, stability, mass_stab,
    mean_alignment, essentially_rank1, causal_gain, typical_norm, top_features: [{feature, sel,
    slope, score, top_tokens}], lape_overlap: {target, english} (null with tracing.lape=false),
    neuron_spectrum}}``; ``lape`` (totals; ``{"skipped": true}`` with tracing.lape=false);
    ``token_sets`` (sizes); ``tracing_source`` (``cache`` | ``model``);
    ``runtime_seconds`` per step; ``forward_passes`` per step (counted by a hook on the model:
    every call of the model's forward); ``findings``; ``warnings``; ``provenance`` (model info
    and fingerprint, cache path / config hash / tokenizer hash, per-site SAE path + sha256,
    the resolved config); ``files``. Non-finite numbers are written as ``null``.
``localise/layers.json``
    ``{"ℓ": full record}``: selectivity of both variants (top 20), lift (α grid, per-feature lift
    and slope, cost), ranking (every screened feature with Sel, slope, score, cumulative gain),
    causal gain details, trace (N_t, N_en, top neurons with z and t), LAPE sets, SAE-code and
    neuron spectra (σ, eigengap, r_eff, Mass, Stab, ‖Pμ‖/‖μ‖, nulls), per-step seconds and
    forward passes.
``directions.safetensors``  (the steering runtime's input)
    Header metadata (strings): ``format="foxp2-localise-directions"``, ``format_version="1"``,
    ``target``, ``english``, ``window`` (JSON list), ``layers`` (JSON list), ``model`` (JSON),
    ``saes`` (JSON ``{site: path}``), ``selectivity_reduction``, ``tracing_reduction``.
    Global tensors: ``window`` int64 (W,), ``layers`` int64 (every analysed layer). For every
    analysed layer ℓ (window layers and the others, so a tuning stage may move the window),
    under the prefix ``layers.{ℓ}.``:

    ==================  ===============  ====================================================
    ``feature_ids``     int64 (K,)       selected SAE latents, best Score first
    ``feature_scores``  float32 (K,)     their Score = max(Sel,0)·max(LiftSlope,0)
    ``decoder``         float32 (K, d)   their decoder rows (W_dec, unit norm)
    ``encoder``         float32 (K, d)   their encoder rows (W_enc; the SAE takes raw h)
    ``mean_direction``  float32 (d,)     unit mean of the decoder rows (zeros when K = 0)
    ``mu_target``       float32 (n_lat,) mean code of target sentences (discovery pairs)
    ``mu_english``      float32 (n_lat,) mean code of their English translations
    ``support``         int64 (|S|,)     latents of the spectrum's support S_ℓ
    ``basis``           float32 (|S|, r) top-r right-singular vectors V_r of ΔZ on S_ℓ
    ``target_neurons``  int64 (|N_t|,)   traced MLP neurons (largest score first)
    ``english_neurons`` int64 (|N_en|,)
    ``neuron_mu_target``   float32 (n_neurons,)  mean MLP activation, target sentences
    ``neuron_mu_english``  float32 (n_neurons,)  … English sentences
    ``typical_norm``    float32 (1,)     s_ℓ, the median token norm of the resid site
    ``english_feature_ids`` int64 (|E|,) most English-selective latents (Sel < 0, at most
                                         ``selectivity.n_english``), most selective first
    ``english_encoder`` float32 (|E|, d) their encoder rows
    ``english_bias``    float32 (|E|,)   their effective encoder bias b_enc − W_enc·b_dec (so
                                         ``english_encoder @ h + english_bias`` are their
                                         pre-activations on raw h)
    ``english_decoder`` float32 (|E|, d) their decoder rows
    ``support_decoder`` float32 (|S|, d) decoder rows of the support S_ℓ
    ``support_encoder`` float32 (|S|, d) their encoder rows (the steer's saturation gate)
    ``support_bias``    float32 (|S|,)   their effective encoder bias
    ==================  ===============  ====================================================

    d = the model width; pushes are relative to ``typical_norm`` (h += α·s_ℓ·d_j). ``basis``
    has r = 0 columns when the layer's ΔZ was all zero.
``plots/``
    ``spectra.png`` (σ_i/σ_1 per layer with the shuffled-pair null), ``neuron_spectra.png``,
    ``eigengap_reff.png``, ``window_scores.png``, ``selectivity_vs_lift/layer_{ℓ}.png``,
    ``top_features.png`` (top features of the window layers with their top tokens).

Re-running: everything is recomputed and overwritten, unless ``resume=true``: then each
layer's lift and causal-gain results in ``localise/work/layer_{ℓ}.json`` are reused when their
key (model fingerprint, SAE sha256, token sets, prompts, lift settings and the screened
candidate ids) is unchanged; the cheap steps are always recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_train.cache.reader import ActivationCache
from sae_train.corpora.embedded import load_embedded_prompts
from steering.language.defaultness import DefaultnessResult, defaultness
from steering.language.token_sets import LanguageTokenSets, build_language_token_sets
from steering.localise.config import LocaliseAppConfig, as_config
from steering.localise.inputs import (check_languages, corpus_texts, lift_prompt_indices,
                                      open_cache, paired_mlp_activations_from_model,
                                      provenance_checks, resolve_layers, tracing_source)
from steering.localise.lape import (activation_probabilities_from_cache,
                                    activation_probabilities_from_model,
                                    stored_activation_probabilities)
from steering.localise.layer import (RANK1_ALIGNMENT, LayerInputs, LayerResult, analyse_layer,
                                     spectrum_row)
from steering.localise.ledger import (Ledger, LocaliseError, count_forwards, digest, jsonable,
                                      write_json)
from steering.localise.outputs import write_directions, write_plots
from steering.localise.selectivity import paired_documents
from steering.localise.tracing import lape_overlap
from steering.localise.window import WindowChoice, WindowError, choose_window

log = logging.getLogger("foxp2-localise")

FORMAT = "foxp2-localise"
DIRECTIONS_FORMAT = "foxp2-localise-directions"
FORMAT_VERSION = 1

__all__ = ["DIRECTIONS_FORMAT", "FORMAT", "FORMAT_VERSION", "LocaliseError",
           "paired_mlp_activations_from_model", "run_localise"]


@dataclass
class LocalisePaths:
    """Where a localisation writes (module docstring, Outputs)."""

    out: Path
    loc: Path
    plots: Path
    work: Path

    @classmethod
    def under(cls, out_dir: str | Path) -> "LocalisePaths":
        out = Path(out_dir)
        return cls(out, out / "localise", out / "plots", out / "localise" / "work")


@dataclass
class LocaliseInputs:
    """Step 0: the checked inputs and the model."""

    cache: ActivationCache
    pairs: np.ndarray
    sae_paths: dict[int, Path]
    layers: list[int]
    source: str  # where neuron activations come from: "cache" or "model"
    max_length: int  # the model path's token window
    model: Any
    tokenizer: Any
    info: Any
    tokenizer_digest: str
    warnings: list[str]


@dataclass
class TokenSets:
    """Step 1: V_t, V_en, their JSON (as written) and its digest."""

    sets: LanguageTokenSets
    as_json: dict
    digest: str


@dataclass
class Baseline:
    """Step 2: the unsteered ΔM on the discovery prompts; the lift's subset of them."""

    prompts: list
    result: DefaultnessResult
    lift_prompts: list
    lift_baseline: Tensor


@dataclass
class Lape:
    """LAPE's language neurons on the same activations, and their overlap with the traced."""

    probs: Any
    neurons: dict
    reused: bool
    overlap: dict = field(default_factory=dict)  # filled in by attach_lape


def run_localise(cfg, model_bundle: tuple | None = None) -> dict:
    """Run the whole localisation for ``cfg`` (a :class:`LocaliseAppConfig` or the app's
    DictConfig); write the outputs and return the summary. ``model_bundle``: an already loaded
    ``(model, tokenizer, ModelInfo)`` (else ``load_model(cfg.model)``)."""
    cfg: LocaliseAppConfig = as_config(cfg, LocaliseAppConfig)
    started = time.perf_counter()
    set_up_process(cfg)
    ledger, paths = Ledger(), LocalisePaths.under(cfg.out_dir)
    inputs = check_inputs(cfg, model_bundle, ledger, paths)
    with count_forwards(inputs.model, ledger.calls):
        sets = build_token_sets(cfg, inputs, ledger, paths)
        baseline = baseline_defaultness(cfg, inputs, sets, ledger)
        neuron_acts = model_neuron_activations(cfg, inputs, ledger)
        results = {layer: analyse_layer(layer, inputs.sae_paths[layer], LayerInputs(
            cfg, inputs.cache, inputs.model, inputs.tokenizer, inputs.info, sets.sets,
            sets.digest, baseline.lift_prompts, baseline.lift_baseline, neuron_acts, ledger,
            inputs.tokenizer_digest, paths.work))
            for layer in tqdm(inputs.layers, desc="localise layers", disable=not cfg.progress)}
        lape = lape_neurons(cfg, inputs, ledger) if cfg.tracing.lape else None
    if lape is not None:
        lape.overlap = attach_lape(cfg, results, lape, inputs.source)
    write_json(paths.loc / "layers.json", {str(l): r.record for l, r in results.items()})
    choice = choose_layer_window(cfg, results, ledger, paths)
    files = write_outputs(cfg, inputs, results, choice, ledger, paths)
    summary = localise_summary(cfg, inputs, sets, baseline, results, lape, choice, files,
                               ledger, started)
    write_json(paths.loc / "summary.json", summary)
    log.info("done in %.1f s (%d forward passes): window %s, K %s → %s",
             ledger.seconds["total"], ledger.forwards["total"], choice.layers,
             {l: r.ranking.k for l, r in results.items()}, paths.loc / "summary.json")
    return jsonable(summary)


def set_up_process(cfg: LocaliseAppConfig) -> None:
    """Threads, progress bars and the seed."""
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    if not cfg.progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)


def check_inputs(cfg: LocaliseAppConfig, model_bundle: tuple | None, ledger: Ledger,
                 paths: LocalisePaths) -> LocaliseInputs:
    """0. Everything that can be checked without the model first; then the model."""
    from sae_train.models.loading import load_model, tokenizer_hash

    with ledger.step("inputs"):
        cache = open_cache(cfg.cache_dir)
        pairs = check_languages(cache, cfg.target, cfg.english, cfg.selectivity.splits)
        sae_paths = resolve_layers(cache, cfg.sae_dir, cfg.layers)
        layers = sorted(sae_paths)
        source = tracing_source(cache, layers, cfg.tracing.source)
        if len(layers) < cfg.window.min_width:
            raise LocaliseError(
                f"{len(layers)} layer(s) to analyse ({layers}) but window.min_width="
                f"{cfg.window.min_width}; analyse more layers or lower window.min_width")
        model, tokenizer, info = model_bundle if model_bundle is not None \
            else load_model(cfg.model)
        tok_digest = tokenizer_hash(tokenizer)
        warnings = provenance_checks(cache, tok_digest, info)
    for w in warnings:
        log.warning(w)
    log.info("localise %s→%s on %s: %d discovery pairs, layers %s, tracing from the %s → %s",
             cfg.english, cfg.target, info.name, len(pairs), layers, source, paths.out)
    max_length = cfg.tracing.max_length or int(
        cache.manifest.get("config", {}).get("cache", {}).get("max_length") or 128)
    return LocaliseInputs(cache, pairs, sae_paths, layers, source, max_length, model, tokenizer,
                          info, tok_digest, warnings)


def build_token_sets(cfg: LocaliseAppConfig, inputs: LocaliseInputs, ledger: Ledger,
                     paths: LocalisePaths) -> TokenSets:
    """1. V_t, V_en from the corpus texts of the discovery documents (written as JSON)."""
    ts = cfg.token_sets
    with ledger.step("token_sets"):
        texts = corpus_texts(inputs.cache, ts.splits, ts.paired_only)
        sets = build_language_token_sets(
            inputs.tokenizer, texts, [cfg.target, cfg.english], ratio=ts.ratio,
            smoothing=ts.smoothing, min_count=ts.min_count, use_wordfreq=ts.use_wordfreq,
            min_zipf=ts.min_zipf, rivals=list(ts.rivals))
        sets_json = sets.to_json(paths.loc / "token_sets.json", include_ids=True)
        sets_digest = digest(sets_json["ids"])
    log.info("token sets from %s texts: %s", {k: len(v) for k, v in texts.items()}, sets.sizes)
    return TokenSets(sets, sets_json, sets_digest)


def baseline_defaultness(cfg: LocaliseAppConfig, inputs: LocaliseInputs, sets: TokenSets,
                         ledger: Ledger) -> Baseline:
    """2. The unsteered ΔM on the discovery prompts; the lift's seeded subset of them."""
    dc = cfg.defaultness
    with ledger.step("baseline"):
        prompts = load_embedded_prompts([dc.prompt_split])
        if dc.n_prompts is not None:
            prompts = [prompts[i] for i in
                       lift_prompt_indices(len(prompts), dc.n_prompts, cfg.seed)]
        if not prompts:
            raise LocaliseError(f"no embedded prompts in split {dc.prompt_split!r}")
        base: DefaultnessResult = defaultness(
            inputs.model, inputs.tokenizer, prompts, sets.sets, cfg.target, english=cfg.english,
            steps=dc.steps, batch_size=dc.batch_size, template=dc.template)
    lift_idx = lift_prompt_indices(len(prompts), cfg.lift.n_prompts, cfg.seed + 1)
    lift_prompts = [prompts[i] for i in lift_idx]
    lift_baseline = base.delta_m[torch.from_numpy(lift_idx)]
    log.info("baseline ΔM on %d %s prompts: %+.4f (lift on %d of them: %+.4f)",
             len(prompts), dc.prompt_split, base.mean(), len(lift_prompts),
             float(lift_baseline.mean()))
    return Baseline(prompts, base, lift_prompts, lift_baseline)


def model_neuron_activations(cfg: LocaliseAppConfig, inputs: LocaliseInputs, ledger: Ledger
                             ) -> dict | None:
    """4 (model path). MLP activations of the pairs, one pass for every layer; None when the
    cache holds them."""
    if inputs.source != "model":
        return None
    cache = inputs.cache
    with ledger.step("tracing_activations"):
        _, tgt_docs, en_docs = paired_documents(cache, cfg.target, cfg.english,
                                                cfg.selectivity.splits)
        text_of = {d["doc_id"]: d["text"] for d in cache.documents}
        neuron_acts = paired_mlp_activations_from_model(
            inputs.model, inputs.tokenizer, [text_of[int(i)] for i in tgt_docs],
            [text_of[int(i)] for i in en_docs], inputs.layers, cfg.tracing.reduction,
            cfg.tracing.batch_size, inputs.max_length)
    log.info("neuron activations of %d pairs from the model (%d forward passes)",
             len(tgt_docs), ledger.forwards["tracing_activations"])
    return neuron_acts


def lape_neurons(cfg: LocaliseAppConfig, inputs: LocaliseInputs, ledger: Ledger) -> Lape:
    """4. LAPE's language neurons from the same source as the tracing (overlap filled in by
    :func:`attach_lape`)."""
    tc, cache = cfg.tracing, inputs.cache
    with ledger.step("lape"):
        reused = False
        if inputs.source == "cache":
            probs = activation_probabilities_from_cache(cache, inputs.layers, None,
                                                        cfg.selectivity.splits)
        else:
            lape_texts = corpus_texts(cache, cfg.selectivity.splits, paired_only=False)
            # every language of the corpus: the same numbers for each target, so they are
            # kept beside the cache and the next target's localisation reads them
            key = {"model": inputs.info.fingerprint, "tokenizer": inputs.tokenizer_digest,
                   "layers": inputs.layers,
                   "texts": hashlib.sha256(json.dumps(lape_texts, sort_keys=True)
                                           .encode()).hexdigest(),
                   "batch_size": tc.batch_size, "max_length": inputs.max_length,
                   "active": "value", "dtype": inputs.info.dtype}
            probs, reused = stored_activation_probabilities(
                Path(cache.path) / "derived", key,
                lambda: activation_probabilities_from_model(
                    inputs.model, inputs.tokenizer, lape_texts, inputs.layers,
                    batch_size=tc.batch_size, max_length=inputs.max_length))
        neurons = probs.lape_neurons(tc.lape_entropy_quantile, tc.lape_prob_quantile)
    return Lape(probs, neurons, reused)


def attach_lape(cfg: LocaliseAppConfig, results: dict[int, LayerResult], lape: Lape,
                source: str) -> dict:
    """LAPE's sets and their overlap with N_t / N_en added to every layer's record; the
    overlap (per layer and in total)."""
    traced_t = {l: r.trace.target_neurons if r.trace is not None else [] for l, r in
                results.items()}
    traced_en = {l: r.trace.english_neurons if r.trace is not None else [] for l, r in
                 results.items()}
    overlap = {"target": lape_overlap(traced_t, lape.neurons[cfg.target]),
               "english": lape_overlap(traced_en, lape.neurons[cfg.english])}
    for layer, r in results.items():
        r.record["lape"] = {"target_neurons": lape.neurons[cfg.target][layer].tolist(),
                            "english_neurons": lape.neurons[cfg.english][layer].tolist(),
                            "overlap_target": overlap["target"]["per_layer"][layer],
                            "overlap_english": overlap["english"]["per_layer"][layer]}
    log.info("LAPE (%s): %d target / %d English neurons over the layers; traced N_t ∩ LAPE = "
             "%d, N_en ∩ LAPE = %d", source, overlap["target"]["total"]["n_lape"],
             overlap["english"]["total"]["n_lape"], overlap["target"]["total"]["intersection"],
             overlap["english"]["total"]["intersection"])
    return overlap


def choose_layer_window(cfg: LocaliseAppConfig, results: dict[int, LayerResult],
                        ledger: Ledger, paths: LocalisePaths) -> WindowChoice:
    """The window: contiguous layers maximising Mass·Stab (an error summary when none)."""
    wc = cfg.window
    with ledger.step("window"):
        values = {l: (r.spectrum.mass_stab if r.spectrum is not None else 0.0)
                  for l, r in results.items()}
        nulls = None
        if wc.null is not None:
            missing = [l for l, r in results.items()
                       if r.spectrum is None or wc.null not in r.spectrum.nulls]
            if missing:
                raise LocaliseError(f"window.null={wc.null!r} but layers {missing} have no such "
                                    "null (see layers.json); set window.null=null")
            nulls = {l: r.spectrum.nulls[wc.null].mass_stab for l, r in results.items()}
        gains = {l: r.causal_gain for l, r in results.items() if r.causal_gain is not None}
        try:
            choice = choose_window(values, nulls, gains, min_width=wc.min_width,
                                   max_width=wc.max_width, on_degenerate=wc.on_degenerate)
        except WindowError as err:
            write_json(paths.loc / "summary.json", {"format": FORMAT, "error": str(err),
                                                    "layers": {str(l): r.record.get("k")
                                                               for l, r in results.items()}})
            raise LocaliseError(f"no window: {err} (per-layer results in "
                                f"{paths.loc / 'layers.json'})") from err
    log.info("window: layers %s (score %s)%s", choice.layers, choice.score,
             " — FLAGGED: " + "; ".join(choice.warnings) if choice.flagged else "")
    return choice


def sae_provenance(inputs: LocaliseInputs, results: dict[int, LayerResult]) -> dict:
    return {r.site: {"path": str(inputs.sae_paths[l]), "sha256": r.record.get("sae_sha256"),
                     "kind": r.record.get("sae_kind"), "n_latents": r.record.get("n_latents")}
            for l, r in results.items()}


def write_outputs(cfg: LocaliseAppConfig, inputs: LocaliseInputs,
                  results: dict[int, LayerResult], choice: WindowChoice, ledger: Ledger,
                  paths: LocalisePaths) -> dict:
    """directions.safetensors and the plots; the files written (summary.json's ``files``)."""
    with ledger.step("outputs"):
        saes = {s: v["path"] for s, v in sae_provenance(inputs, results).items()}
        dir_meta = {"format": DIRECTIONS_FORMAT, "format_version": str(FORMAT_VERSION),
                    "target": cfg.target, "english": cfg.english,
                    "window": json.dumps(choice.layers), "layers": json.dumps(inputs.layers),
                    "model": json.dumps(jsonable(inputs.info.to_dict())),
                    "saes": json.dumps(saes),
                    "selectivity_reduction": cfg.selectivity.reduction,
                    "tracing_reduction": cfg.tracing.reduction}
        directions = write_directions(paths.out / "directions.safetensors", results,
                                      choice.layers, dir_meta)
        files = {"summary": str(paths.loc / "summary.json"),
                 "layers": str(paths.loc / "layers.json"),
                 "token_sets": str(paths.loc / "token_sets.json"), "directions": str(directions)}
        if cfg.plots != "none":
            if paths.plots.is_dir():  # no stale plots of layers a previous run analysed
                shutil.rmtree(paths.plots)
            files["plots"] = write_plots(paths.plots, results, choice,
                                         per_layer=cfg.plots == "all")
    return files


def layer_rows(results: dict[int, LayerResult], overlap: dict | None, choice: WindowChoice) -> dict:
    """summary.json's ``layers``: one row per analysed layer."""
    per_layer = {}
    for layer, r in results.items():
        per_layer[str(layer)] = {
            "k": r.ranking.k, "selected": r.ranking.selected.tolist(),
            "n_target_neurons": 0 if r.trace is None else int(r.trace.target_neurons.numel()),
            "n_english_neurons": 0 if r.trace is None
            else int(r.trace.english_neurons.numel()),
            "causal_gain": r.causal_gain,
            "causal_gain_direction": (r.record["causal_gain"] or {}).get("direction"),
            "typical_norm": r.scale, "n_pairs": r.codes.n_pairs,
            **spectrum_row(r.spectrum),
            "neuron_spectrum": spectrum_row(r.neuron_spectrum)
            if r.neuron_spectrum is not None else None,
            "top_features": r.top_features,
            "lape_overlap": None if overlap is None else {
                "target": overlap["target"]["per_layer"][layer],
                "english": overlap["english"]["per_layer"][layer]},
            "in_window": layer in choice.layers}
    return per_layer


def localise_findings(results: dict[int, LayerResult]) -> list[str]:
    rank1 = [l for l, r in results.items()
             if r.spectrum is not None and spectrum_row(r.spectrum)["essentially_rank1"]]
    if not rank1:
        return []
    return [f"the paired-difference spectrum is essentially rank 1 (the mean language shift: "
            f"r = 1 and ‖Pμ‖/‖μ‖ ≥ {RANK1_ALIGNMENT}) at layers {rank1}"]


def localise_summary(cfg: LocaliseAppConfig, inputs: LocaliseInputs, sets: TokenSets,
                     baseline: Baseline, results: dict[int, LayerResult], lape: Lape | None,
                     choice: WindowChoice, files: dict, ledger: Ledger, started: float) -> dict:
    """summary.json (module docstring); the ledger's totals are closed here."""
    dc, cache = cfg.defaultness, inputs.cache
    warnings = inputs.warnings + choice.warnings + \
        [w for r in results.values() for w in r.record["warnings"]]
    ledger.seconds["total"] = time.perf_counter() - started
    ledger.forwards["total"] = sum(v for k, v in ledger.forwards.items() if k != "total")
    prov = cache.manifest.get("config", {}).get("provenance", {}) or {}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "target": cfg.target, "english": cfg.english, "layers_analysed": inputs.layers,
        "window": choice.to_dict(),
        "baseline": {"split": dc.prompt_split, "n_prompts": len(baseline.prompts),
                     "steps": dc.steps, "template": dc.template,
                     "mean_delta_m": baseline.result.mean(),
                     "lift_prompts": len(baseline.lift_prompts),
                     "lift_prompts_mean_delta_m": float(baseline.lift_baseline.mean())},
        "layers": layer_rows(results, None if lape is None else lape.overlap, choice),
        "lape": {"skipped": True} if lape is None else {
            "source": inputs.source, "n_tokens": lape.probs.n_tokens,
            "reused": lape.reused, "target": lape.overlap["target"]["total"],
            "english": lape.overlap["english"]["total"]},
        "token_sets": {"sizes": sets.sets.sizes, "tokenizer": sets.sets.tokenizer,
                       "by_source": sets.as_json["by_source"]},
        "tracing_source": inputs.source,
        "n_pairs": len(inputs.pairs),
        "runtime_seconds": ledger.seconds,
        "forward_passes": ledger.forwards,
        "findings": localise_findings(results),
        "warnings": list(dict.fromkeys(warnings)),
        "provenance": {
            "model": inputs.info.to_dict(),
            "tokenizer": inputs.tokenizer_digest,
            "cache": {"path": str(Path(cfg.cache_dir).resolve()),
                      "config_hash": cache.manifest.get("config_hash"),
                      "model": prov.get("model"), "tokenizer": prov.get("tokenizer"),
                      "n_tokens": cache.n_tokens},
            "saes": sae_provenance(inputs, results),
            "config": dataclasses.asdict(cfg),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "files": files,
    }
