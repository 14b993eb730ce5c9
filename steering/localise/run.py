"""Neural FOXP2 stages I–II for one target language, as one plain function.

:func:`run_localise` glues the pieces of ``steering`` into the pipeline that ``foxp2-localise``
(:mod:`steering.apps.localise_app`) runs; settings are :class:`steering.localise.config.LocaliseAppConfig`.
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
   ``window.min_width``–``max_width`` layers maximising mean Mass·Stab (steering.localise.window), each
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
    slope, score, top_tokens}], lape_overlap: {target, english}, neuron_spectrum}}``;
    ``lape`` (totals); ``token_sets`` (sizes); ``tracing_source`` (``cache`` | ``model``);
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
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from sae_train.cache.capture import capture_sites, run_capture
from sae_train.cache.manifest import CacheError, file_sha256
from sae_train.cache.reader import ActivationCache
from sae_train.cache.writer import pad_contexts, plan_contexts
from sae_train.corpora.embedded import load_embedded_prompts
from sae_train.models.sites import resolve_sites
from steering.localise.config import LocaliseAppConfig
from steering.language.defaultness import DefaultnessResult, defaultness
from steering.localise.lape import (activation_probabilities_from_cache, activation_probabilities_from_model,
                           stored_activation_probabilities)
from steering.localise.lift import (FeatureRanking, LiftResult, direction_top_tokens, logit_mass_lift,
                           rank_by_selectivity_and_lift, rank_features, typical_norm_from_cache,
                           unit_rows)
from steering.localise.selectivity import (PairedCodes, Selectivity, paired_codes_from_cache,
                                  paired_documents, selectivity_from_cache)
from steering.localise.spectra import LayerSpectrum, difference_matrix, layer_spectrum
from steering.language.token_sets import LanguageTokenSets, build_language_token_sets
from steering.localise.tracing import NeuronTrace, TailRule, lape_overlap, trace_resid_features
from steering.localise.window import WindowChoice, WindowError, choose_window

log = logging.getLogger("foxp2-localise")

FORMAT = "foxp2-localise"
DIRECTIONS_FORMAT = "foxp2-localise-directions"
FORMAT_VERSION = 1
RANK1_ALIGNMENT = 0.9  # rank 1 and ‖Pμ‖/‖μ‖ ≥ this: "essentially the mean"


class LocaliseError(ValueError):
    """Inputs the localisation cannot run on (names the input, what is wrong, what to do)."""


# --------------------------------------------------------------------------- bookkeeping
@dataclass
class _Ledger:
    """Seconds and model forward passes per step (summed over layers)."""

    seconds: dict[str, float] = field(default_factory=dict)
    forwards: dict[str, int] = field(default_factory=dict)
    calls: list[int] = field(default_factory=lambda: [0])

    @contextmanager
    def step(self, name: str, record: dict | None = None):
        start, calls = time.perf_counter(), self.calls[0]
        try:
            yield
        finally:
            dt, n = time.perf_counter() - start, self.calls[0] - calls
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            self.forwards[name] = self.forwards.get(name, 0) + n
            if record is not None:
                record.setdefault("seconds", {})[name] = dt
                record.setdefault("forward_passes", {})[name] = n


@contextmanager
def _count_forwards(model, counter: list[int]):
    """Count every call of ``model``'s forward (the top-level module) into ``counter[0]``."""
    def hook(_module, _args, _kwargs):
        counter[0] += 1
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _jsonable(obj: Any) -> Any:
    """Tensors, numpy values and dataclasses → JSON types; NaN/inf → None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    return obj


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), ensure_ascii=False, indent=2) + "\n",
                   encoding="utf-8")
    tmp.replace(path)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(_jsonable(obj), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- inputs
def open_cache(cache_dir: str | Path) -> ActivationCache:
    try:
        return ActivationCache(cache_dir)
    except CacheError as err:
        raise LocaliseError(f"{err} (cache_dir={cache_dir})") from err


def check_languages(cache: ActivationCache, target: str, english: str,
                    splits: Sequence[str]) -> np.ndarray:
    """The discovery pair ids of (target, english); an error names what the cache has."""
    missing = [lang for lang in (target, english) if lang not in cache.languages]
    if missing:
        raise LocaliseError(
            f"language(s) {missing} are not in the cache at {cache.path}: it has "
            f"{cache.languages}. Pick target from {[l for l in cache.languages if l != english]}"
            f" or re-cache with data.languages including {missing}")
    try:
        pairs, _, _ = paired_documents(cache, target, english, splits)
    except ValueError as err:
        raise LocaliseError(str(err)) from err
    if len(pairs) < 2:
        raise LocaliseError(f"the cache at {cache.path} has only {len(pairs)} {target}/{english} "
                            f"pair(s) in splits {list(splits)}; selectivity needs at least 2")
    return pairs


def resolve_layers(cache: ActivationCache, sae_dir: str | Path,
                   layers: Sequence[int] | None) -> dict[int, Path]:
    """``{layer: SAE folder}`` of the layers to analyse (rule in the module docstring)."""
    sae_dir = Path(sae_dir)
    cached = sorted(int(s["layer"]) for s in cache.sites.values() if s["kind"] == "resid")
    if not sae_dir.is_dir():
        raise LocaliseError(f"sae_dir {sae_dir} does not exist; train SAEs with sae-train "
                            f"(export.dir={sae_dir}) or point sae_dir at their folder")
    found = sorted(p.parent.name for p in sae_dir.glob("*/cfg.json"))
    have = {l for l in range(max(cached, default=-1) + 1)
            if (sae_dir / f"layers.{l}.resid" / "cfg.json").is_file()}
    if layers is None:
        chosen = [l for l in cached if l in have]
        if not chosen:
            raise LocaliseError(
                f"no layer has both a cached resid site and an SAE: the cache at {cache.path} "
                f"has {', '.join(f'layers.{l}.resid' for l in cached) or 'no resid site'}; "
                f"sae_dir {sae_dir} has {', '.join(found) or 'no SAE folders'}")
        return {l: sae_dir / f"layers.{l}.resid" for l in chosen}
    layers = [int(l) for l in layers]
    if len(set(layers)) != len(layers):
        raise LocaliseError(f"layers={layers} repeats a layer")
    no_cache = [l for l in layers if l not in cached]
    if no_cache:
        raise LocaliseError(
            f"layer(s) {no_cache} have no cached resid site in {cache.path}; it has "
            f"{', '.join(f'layers.{l}.resid' for l in cached)} (re-cache with those sites or "
            "drop the layers)")
    no_sae = [l for l in layers if not (sae_dir / f"layers.{l}.resid" / "cfg.json").is_file()]
    if no_sae:
        raise LocaliseError(
            f"sae_dir {sae_dir} has no SAE for site(s) "
            f"{', '.join(f'layers.{l}.resid' for l in no_sae)} (no <site>/cfg.json); it has "
            f"{', '.join(found) or 'no SAE folders'}. Train them with sae-train "
            f"sites=layers.{no_sae[0]}.resid, or drop those layers")
    return {l: sae_dir / f"layers.{l}.resid" for l in sorted(layers)}


def tracing_source(cache: ActivationCache, layers: Sequence[int], source: str) -> str:
    """"cache" when every layer's ``layers.{i}.mlp`` is cached (or required), else "model"."""
    missing = [l for l in layers if f"layers.{l}.mlp" not in cache.sites]
    if source == "model":
        return "model"
    if source == "cache" and missing:
        raise LocaliseError(
            f"tracing.source=cache but the cache at {cache.path} lacks "
            f"{', '.join(f'layers.{l}.mlp' for l in missing)}; re-cache with sites "
            "layers.*.mlp or use tracing.source=auto (runs the model)")
    return "model" if missing else "cache"


def corpus_texts(cache: ActivationCache, splits: Sequence[str], paired_only: bool
                 ) -> dict[str, list[str]]:
    """Texts of the cache's documents in ``splits``, per language (every language present)."""
    texts: dict[str, list[str]] = {}
    for doc in cache.documents:
        if doc["split"] not in splits or (paired_only and int(doc.get("pair_id", -1)) < 0):
            continue
        if "text" not in doc:
            raise LocaliseError(f"the cache at {cache.path} stores no document texts "
                                "(documents.jsonl without 'text'); re-cache it with sae-cache")
        texts.setdefault(doc["language"], []).append(doc["text"])
    if not texts:
        raise LocaliseError(f"the cache at {cache.path} has no documents in splits "
                            f"{list(splits)}{' with a pair_id' if paired_only else ''}")
    return texts


def provenance_checks(cache: ActivationCache, tokenizer_digest: str, info) -> list[str]:
    """Tokenizer mismatch → error; weights-fingerprint mismatch → a warning (returned)."""
    prov = cache.manifest.get("config", {}).get("provenance", {}) or {}
    cached_tok = prov.get("tokenizer")
    if cached_tok and cached_tok != tokenizer_digest:
        raise LocaliseError(
            f"the cache at {cache.path} was written with another tokenizer (hash {cached_tok}) "
            f"than model {info.name!r} has ({tokenizer_digest}); use the model the cache was "
            f"made with ({prov.get('model', {}).get('name', '?')}) or re-cache")
    warnings = []
    cached_fp = (prov.get("model") or {}).get("fingerprint")
    if cached_fp and cached_fp != info.fingerprint:
        warnings.append(
            f"the cache was written by weights with fingerprint {cached_fp} "
            f"({prov.get('model', {}).get('dtype')}); the loaded model has {info.fingerprint} "
            f"({info.dtype}). Fine if only the dtype differs; otherwise re-cache")
    return warnings


def load_layer_sae(path: Path, site: str, width: int, tokenizer_digest: str, device):
    from sae_train.saes import load_sae

    sae = load_sae(path, device=device)
    if sae.d_in != width:
        raise LocaliseError(f"the SAE at {path} takes d_in={sae.d_in} but {site} has width "
                            f"{width} in the cache: an SAE of another model or site")
    meta = getattr(sae, "metadata", {}) or {}
    if meta.get("site") not in (None, site):
        raise LocaliseError(f"the SAE at {path} was trained on {meta['site']!r}, not {site!r}")
    if meta.get("tokenizer") not in (None, tokenizer_digest):
        raise LocaliseError(f"the SAE at {path} was trained on a cache of another tokenizer "
                            f"({meta['tokenizer']} ≠ {tokenizer_digest})")
    return sae


def lift_prompt_indices(n_available: int, n: int, seed: int) -> np.ndarray:
    """A seeded subset of ``n`` of ``n_available`` prompt indices, ascending."""
    if n >= n_available:
        return np.arange(n_available)
    return np.sort(np.random.default_rng(seed).choice(n_available, n, replace=False))


# --------------------------------------------------------------------------- neurons (model)
@torch.inference_mode()
def paired_mlp_activations_from_model(model, tokenizer, target_texts: Sequence[str],
                                      english_texts: Sequence[str], layers: Sequence[int],
                                      reduction: str = "mean", batch_size: int = 16,
                                      max_length: int = 128) -> dict[int, tuple[Tensor, Tensor]]:
    """Per-sentence ``layers.{ℓ}.mlp`` activations of parallel texts by running the model.

    Documents are tokenised with special tokens and split into windows of ``max_length`` as the
    cache writer does (``plan_contexts``), left-padded, run once for all layers (stopping after
    the deepest); special tokens and padding are dropped. ``"mean"``: the mean over the
    document's text tokens (all windows); ``"last"``: its last text token (of its last window).
    Returns ``{layer: (target (n, n_neurons), english (n, n_neurons))}`` in float32, row k of
    both from text k.
    """
    if len(target_texts) != len(english_texts):
        raise ValueError(f"{len(target_texts)} target texts but {len(english_texts)} English")
    sites = resolve_sites(model, [f"layers.{l}.mlp" for l in layers])

    @dataclass
    class _Doc:
        text: str

    docs = [_Doc(t) for t in list(target_texts) + list(english_texts)]
    contexts = plan_contexts(docs, tokenizer, max_length, sort_by_length=False)
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i].ids))  # less padding
    n_docs, device = len(docs), next(model.parameters()).device
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None),
                  0)
    sums = {s.name: torch.zeros(n_docs, s.width, dtype=torch.float64) for s in sites}
    last = {s.name: torch.zeros(n_docs, s.width, dtype=torch.float32) for s in sites}
    # The document's last window: the last of its contexts in plan order.
    last_window = torch.full((n_docs,), -1, dtype=torch.long)
    for i, c in enumerate(contexts):
        last_window[c.doc_index] = i
    counts = torch.zeros(n_docs, dtype=torch.float64)
    with capture_sites(model, sites) as store:
        for start in range(0, len(order), batch_size):
            batch = [contexts[i] for i in order[start:start + batch_size]]
            ids, attn, keep = pad_contexts(batch, pad_id)
            length = ids.shape[1]
            acts = run_capture(model, store, ids.to(device), attn.to(device))
            doc_of = torch.tensor([c.doc_index for c in batch])
            window_of = torch.tensor(order[start:start + batch_size])
            last_col = (keep.long() * torch.arange(length)).argmax(-1)  # last kept token per row
            counts.index_add_(0, doc_of, keep.sum(-1).double())
            is_last = window_of == last_window[doc_of]
            rows = torch.arange(len(batch))[is_last]
            for s in sites:
                a = acts[s.name].float().cpu()
                sums[s.name].index_add_(0, doc_of, (a * keep[..., None]).sum(1).double())
                last[s.name][doc_of[is_last]] = a[rows, last_col[is_last]]
    if (counts == 0).any():
        raise LocaliseError(f"{int((counts == 0).sum())} documents have no text tokens")
    out = {}
    n = len(target_texts)
    for layer, s in zip(layers, sites):
        per_doc = (sums[s.name] / counts[:, None]).float() if reduction == "mean" else last[s.name]
        out[int(layer)] = (per_doc[:n].contiguous(), per_doc[n:].contiguous())
    return out


# --------------------------------------------------------------------------- per layer
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


def _spectrum_row(spec: LayerSpectrum | None) -> dict:
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


def _empty_ranking(warning: str) -> FeatureRanking:
    empty = torch.zeros(0)
    ranking = rank_features(torch.zeros(0, dtype=torch.long), empty, empty)
    ranking.warnings.append(warning)
    return ranking


def _lift_key(cfg: LocaliseAppConfig, info, sae_sha: str, sets_digest: str, prompts: list[str],
              candidates: Tensor, scale: float) -> str:
    lift = dataclasses.asdict(cfg.lift)
    return _digest({"model": info.fingerprint, "dtype": info.dtype, "sae": sae_sha,
                    "sets": sets_digest, "prompts": prompts, "lift": lift,
                    "defaultness": dataclasses.asdict(cfg.defaultness),
                    "candidates": candidates.tolist(), "scale": scale, "target": cfg.target,
                    "english": cfg.english})


def analyse_layer(layer: int, sae_path: Path, *, cfg: LocaliseAppConfig, cache, model,
                  tokenizer, info, sets: LanguageTokenSets, sets_digest: str,
                  lift_prompts: list, baseline: Tensor, neuron_acts, ledger: _Ledger,
                  tokenizer_digest: str, work_dir: Path) -> LayerResult:
    """Steps 3–5 (up to the window) for one layer; see the module docstring."""
    site = f"layers.{layer}.resid"
    device = next(model.parameters()).device
    rec: dict[str, Any] = {"layer": layer, "site": site, "sae": str(sae_path), "warnings": []}
    sc = cfg.selectivity
    with ledger.step("load_sae", rec):
        sae = load_layer_sae(sae_path, site, cache.width(site), tokenizer_digest, device)
        sae_sha = file_sha256(sae_path / "sae.safetensors") \
            if (sae_path / "sae.safetensors").is_file() else None
    rec.update(n_latents=sae.n_latents, sae_kind=sae.config.kind, sae_sha256=sae_sha)
    decoder = sae.W_dec.detach().float().cpu()
    encoder = sae.encoder_weight.detach().float().cpu()
    # Pre-activations of the saved (scale-folded) SAE: (h − b_dec)·W_encᵀ + b_enc.
    encoder_bias = (sae.b_enc.detach().float().cpu() - encoder @ sae.b_dec.detach().float().cpu())

    # 3a. selectivity (both variants; one ranks)
    with ledger.step("selectivity", rec):
        sel, codes = selectivity_from_cache(cache, site, sae.encode, cfg.target, cfg.english,
                                            sc.splits, sc.reduction, sc.eps, sc.chunk_tokens,
                                            device)
        other = "mean" if sc.reduction == "last" else "last"
        sel_other, _ = selectivity_from_cache(cache, site, sae.encode, cfg.target, cfg.english,
                                              sc.splits, other, sc.eps, sc.chunk_tokens, device)
    sel, codes.target, codes.english = _to_cpu(sel), codes.target.cpu(), codes.english.cpu()
    sel_other = _to_cpu(sel_other)
    top_m = cfg.lift.top_m
    a, b = set(sel.top(top_m).tolist()), set(sel_other.top(top_m).tolist())
    rec["selectivity"] = {sc.reduction: sel.to_dict(top=20), other: sel_other.to_dict(top=20),
                          "ranking_variant": sc.reduction,
                          f"top_{top_m}_overlap": len(a & b) / max(1, len(a | b))}
    log.info("[layer %d] selectivity on %d pairs: %d of %d latents with Sel > 0 (max %.3f; "
             "%s variant max %.3f)", layer, codes.n_pairs, int((sel.sel > 0).sum()),
             sae.n_latents, float(sel.sel.max()), other, float(sel_other.sel.max()))

    # 3b. typical norm, lift, ranking, K
    with ledger.step("typical_norm", rec):
        scale = typical_norm_from_cache(cache, site, sc.splits, max_tokens=cfg.lift.norm_tokens,
                                        seed=cfg.seed)
    rec["typical_norm"] = scale
    lc, dc = cfg.lift, cfg.defaultness
    lift_kwargs = dict(english=cfg.english, steps=dc.steps, batch_size=lc.batch_size,
                       template=dc.template, baseline=baseline)
    candidates = torch.sort(sel.sel, descending=True, stable=True).indices
    candidates = candidates[sel.sel[candidates] > 0][:top_m]
    prompt_texts = [p.text for p in lift_prompts]
    key = _lift_key(cfg, info, sae_sha or str(sae_path), sets_digest, prompt_texts, candidates,
                    scale)
    work_file = work_dir / f"layer_{layer}.json"
    cached = None
    if cfg.resume and work_file.is_file():
        stored = json.loads(work_file.read_text())
        if stored.get("key") == key:
            cached = stored
            log.info("[layer %d] resume: lift and causal gain from %s", layer, work_file)
        else:
            log.info("[layer %d] resume: %s is stale (inputs or settings changed); recomputing",
                     layer, work_file)
    lift: LiftResult | None = None
    with ledger.step("lift", rec):
        if len(candidates) == 0:
            ranking = _empty_ranking(f"layer {layer}: no latent has Sel > 0; nothing to verify")
        elif cached is not None:
            slope = torch.tensor(cached["lift"]["slope"], dtype=torch.float32)
            ranking = rank_features(candidates, sel.sel[candidates], slope, lc.saturation,
                                    lc.min_k, lc.max_k)
            rec["lift"] = cached["lift"]
        else:
            ranking, lift = rank_by_selectivity_and_lift(
                model, tokenizer, lift_prompts, sets, cfg.target, site, sel.sel, decoder, scale,
                top_m=top_m, alphas=list(lc.alphas), saturation=lc.saturation, min_k=lc.min_k,
                max_k=lc.max_k, **lift_kwargs)
            rec["lift"] = lift.to_dict()
    rec["ranking"] = ranking.to_dict()
    rec["k"] = ranking.k
    rec["warnings"] += ranking.warnings
    log.info("[layer %d] lift of %d candidates on %d prompts: K = %d (best score %.4g)", layer,
             len(candidates), len(lift_prompts), ranking.k,
             float(ranking.score[0]) if len(ranking.score) else float("nan"))

    # 3c. single-layer causal gain
    k = ranking.k
    mean_direction = torch.zeros(decoder.shape[1])
    if k > 0:
        mean_direction = unit_rows(decoder[ranking.selected]).mean(0)
        norm = float(mean_direction.norm())
        mean_direction = mean_direction / norm if norm > 0 else torch.zeros_like(mean_direction)
    alpha = lc.causal_alpha if lc.causal_alpha is not None else max(lc.alphas, key=abs)
    if k > 0 and lc.causal_gain == "mean_direction" and float(mean_direction.norm()) > 0:
        kind, push = f"mean_direction of the top-{k} features", mean_direction
    elif len(ranking.feature_ids):
        kind = "top_feature" if k > 0 else "top_feature (K = 0: best-ranked screened feature)"
        push = unit_rows(decoder[ranking.feature_ids[:1]])[0]
    else:
        kind, push = None, None
    causal_gain = None
    with ledger.step("causal_gain", rec):
        if push is not None and cached is not None and cached.get("causal") is not None:
            causal = cached["causal"]
            causal_gain = causal["gain"]
        elif push is not None:
            res = logit_mass_lift(model, tokenizer, lift_prompts, sets, cfg.target, site,
                                  push[None], [alpha], scale, **lift_kwargs)
            causal_gain = float(res.lift[0, 0])
            causal = {"gain": causal_gain, "alpha": alpha, "direction": kind,
                      "delta_m_mean": float(res.delta_m.mean()), "cost": res.cost}
        else:
            causal = None
    rec["causal_gain"] = causal
    log.info("[layer %d] single-layer causal gain (%s, α=%g): %s", layer, kind, alpha,
             "n/a" if causal_gain is None else f"{causal_gain:+.4f}")
    if cached is None and rec.get("lift") is not None:
        _write_json(work_file, {"key": key, "lift": rec["lift"], "causal": causal})

    # top features with their top tokens
    with ledger.step("top_tokens", rec):
        n_top = min(lc.n_top_features, len(ranking.feature_ids))
        top_ids = ranking.feature_ids[:n_top]
        tokens = direction_top_tokens(model, tokenizer, decoder[top_ids], k=lc.n_top_tokens) \
            if n_top else []
    top_features = [{"feature": int(f), "selected": i < k, "sel": float(ranking.selectivity[i]),
                     "slope": float(ranking.slope[i]), "score": float(ranking.score[i]),
                     "top_tokens": [t for _, t, _ in tokens[i]]}
                    for i, f in enumerate(top_ids.tolist())]
    rec["top_features"] = top_features

    # 4. tracing
    with ledger.step("tracing", rec):
        if neuron_acts is None:
            nc = paired_codes_from_cache(cache, f"layers.{layer}.mlp", cfg.target, cfg.english,
                                         sc.splits, cfg.tracing.reduction, None,
                                         sc.chunk_tokens)
            if not np.array_equal(nc.pair_ids, codes.pair_ids):
                raise LocaliseError(f"layers.{layer}.mlp and {site} hold different pairs in the "
                                    f"cache at {cache.path}")
            act_t, act_en = nc.target.float(), nc.english.float()
        else:
            act_t, act_en = neuron_acts[layer]
        tc = cfg.tracing
        rule = TailRule(tc.z_min, tc.max_fraction, tc.max_size, tc.t_min)
        trace = None
        if k > 0:
            trace = trace_resid_features(model, layer, encoder[ranking.selected], act_t, act_en,
                                         feature_weights=ranking.score[:k], rule=rule,
                                         feature_ids=ranking.selected.tolist(),
                                         fold_post_norm=tc.fold_post_norm)
    rec["trace"] = trace.to_dict() if trace is not None else None
    n_t = 0 if trace is None else int(trace.target_neurons.numel())
    n_en = 0 if trace is None else int(trace.english_neurons.numel())
    log.info("[layer %d] tracing (%s): |N_t| = %d, |N_en| = %d of %d neurons", layer,
             "cache" if neuron_acts is None else "model", n_t, n_en, act_t.shape[1])

    # 5. spectra
    with ledger.step("spectra", rec):
        support = spectrum_support(ranking, cfg.spectra.min_support)
        spec, used, basis, warns = support_spectrum(codes.target, codes.english, support,
                                                    layer=layer, cfg=cfg.spectra,
                                                    seed=cfg.seed + 1000 * layer)
        rec["warnings"] += warns
        neuron_spec = None
        if trace is not None and n_t + n_en >= 2:
            nsup = torch.cat([trace.target_neurons, trace.english_neurons])
            neuron_spec, _, _, nwarns = support_spectrum(act_t, act_en, nsup, layer=layer,
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
    for w in rec["warnings"]:
        log.warning(w)
    return LayerResult(layer, site, rec, sel, codes, ranking, scale, mean_direction, trace,
                       (act_t.mean(0), act_en.mean(0)), spec, used, basis, neuron_spec,
                       decoder, encoder, causal_gain, top_features, encoder_bias,
                       sel.english_top(sc.n_english))


def _to_cpu(sel: Selectivity) -> Selectivity:
    return dataclasses.replace(sel, **{f: getattr(sel, f).cpu() for f in
                                       ("sel", "mean_target", "mean_english", "std_target",
                                        "std_english")})


# --------------------------------------------------------------------------- outputs
def write_directions(path: Path, results: dict[int, LayerResult], window: list[int],
                     meta: dict[str, str]) -> Path:
    """``directions.safetensors`` (format in the module docstring)."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {
        "window": torch.tensor(window, dtype=torch.long),
        "layers": torch.tensor(sorted(results), dtype=torch.long),
    }
    for layer, r in results.items():
        p = f"layers.{layer}."
        sel_ids = r.ranking.selected
        trace = r.trace
        tensors.update({
            p + "feature_ids": sel_ids.long(),
            p + "feature_scores": r.ranking.score[: r.ranking.k].float(),
            p + "decoder": r.decoder[sel_ids].float(),
            p + "encoder": r.encoder[sel_ids].float(),
            p + "mean_direction": r.mean_direction.float(),
            p + "mu_target": r.codes.target.float().mean(0),
            p + "mu_english": r.codes.english.float().mean(0),
            p + "support": r.support.long(),
            p + "basis": r.basis.float(),
            p + "target_neurons": (trace.target_neurons if trace is not None
                                   else torch.zeros(0)).long(),
            p + "english_neurons": (trace.english_neurons if trace is not None
                                    else torch.zeros(0)).long(),
            p + "neuron_mu_target": r.act_means[0].float(),
            p + "neuron_mu_english": r.act_means[1].float(),
            p + "typical_norm": torch.tensor([r.scale], dtype=torch.float32),
            p + "english_feature_ids": r.english_ids.long(),
            p + "english_encoder": r.encoder[r.english_ids].float(),
            p + "english_bias": r.encoder_bias[r.english_ids].float(),
            p + "english_decoder": r.decoder[r.english_ids].float(),
            p + "support_decoder": r.decoder[r.support].float(),
            p + "support_encoder": r.encoder[r.support].float(),
            p + "support_bias": r.encoder_bias[r.support].float(),
        })
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def write_plots(plots: Path, results: dict[int, LayerResult], choice: WindowChoice | None
                ) -> dict[str, str]:
    from steering.localise import plots as P

    written: dict[str, str] = {}
    spectra = {l: r.spectrum for l, r in results.items() if r.spectrum is not None}
    if spectra:
        written["spectra"] = str(P.plot_spectra(spectra, plots / "spectra.png"))
        written["eigengap_reff"] = str(P.plot_eigengap_reff(spectra, plots / "eigengap_reff.png"))
    neuron = {l: r.neuron_spectrum for l, r in results.items() if r.neuron_spectrum is not None}
    if neuron:
        written["neuron_spectra"] = str(P.plot_spectra(neuron, plots / "neuron_spectra.png"))
    if choice is not None:
        written["window_scores"] = str(P.plot_window_scores(choice, plots / "window_scores.png"))
    for layer, r in results.items():
        if len(r.ranking.feature_ids):
            out = plots / "selectivity_vs_lift" / f"layer_{layer}.png"
            written[f"selectivity_vs_lift/layer_{layer}"] = str(P.plot_selectivity_vs_lift(
                r.ranking.selectivity, r.ranking.slope, out,
                feature_ids=r.ranking.feature_ids.tolist(), selected=r.ranking.selected.tolist()))
    shown = choice.layers if choice is not None and choice.layers else sorted(results)
    rows = [{"layer": l, "feature": f["feature"], "sel": f["sel"], "slope": f["slope"],
             "score": f["score"], "top tokens": [t.strip() or repr(t) for t in f["top_tokens"]]}
            for l in shown for f in results[l].top_features]
    if rows:
        written["top_features"] = str(P.plot_top_features(
            rows, plots / "top_features.png", title="Top features (window layers)"))
    return written


# --------------------------------------------------------------------------- the pipeline
def run_localise(cfg, model_bundle: tuple | None = None) -> dict:
    """Run the whole localisation for ``cfg`` (a :class:`LocaliseAppConfig` or the app's
    DictConfig); write the outputs and return the summary. ``model_bundle``: an already loaded
    ``(model, tokenizer, ModelInfo)`` (else ``load_model(cfg.model)``)."""
    from omegaconf import OmegaConf

    from sae_train.models.loading import load_model, tokenizer_hash

    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_object(cfg)
    if not isinstance(cfg, LocaliseAppConfig):
        raise TypeError(f"cfg must be a LocaliseAppConfig; got {type(cfg).__name__}")
    started = time.perf_counter()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    if not cfg.progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)
    ledger = _Ledger()
    out = Path(cfg.out_dir)
    loc, plots_dir, work_dir = out / "localise", out / "plots", out / "localise" / "work"
    warnings: list[str] = []

    # 0. inputs: everything that can be checked without the model first
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
        warnings += provenance_checks(cache, tok_digest, info)
    for w in warnings:
        log.warning(w)
    log.info("localise %s→%s on %s: %d discovery pairs, layers %s, tracing from the %s → %s",
             cfg.english, cfg.target, info.name, len(pairs), layers, source, out)

    with _count_forwards(model, ledger.calls):
        # 1. token sets
        with ledger.step("token_sets"):
            texts = corpus_texts(cache, cfg.token_sets.splits, cfg.token_sets.paired_only)
            ts = cfg.token_sets
            sets = build_language_token_sets(
                tokenizer, texts, [cfg.target, cfg.english], ratio=ts.ratio,
                smoothing=ts.smoothing, min_count=ts.min_count, use_wordfreq=ts.use_wordfreq,
                min_zipf=ts.min_zipf, rivals=list(ts.rivals))
            sets_json = sets.to_json(loc / "token_sets.json", include_ids=True)
            sets_digest = _digest(sets_json["ids"])
        log.info("token sets from %s texts: %s", {k: len(v) for k, v in texts.items()},
                 sets.sizes)

        # 2. baseline ΔM
        dc = cfg.defaultness
        with ledger.step("baseline"):
            prompts = load_embedded_prompts([dc.prompt_split])
            if dc.n_prompts is not None:
                prompts = [prompts[i] for i in
                           lift_prompt_indices(len(prompts), dc.n_prompts, cfg.seed)]
            if not prompts:
                raise LocaliseError(f"no embedded prompts in split {dc.prompt_split!r}")
            base: DefaultnessResult = defaultness(
                model, tokenizer, prompts, sets, cfg.target, english=cfg.english,
                steps=dc.steps, batch_size=dc.batch_size, template=dc.template)
        lift_idx = lift_prompt_indices(len(prompts), cfg.lift.n_prompts, cfg.seed + 1)
        lift_prompts = [prompts[i] for i in lift_idx]
        lift_baseline = base.delta_m[torch.from_numpy(lift_idx)]
        log.info("baseline ΔM on %d %s prompts: %+.4f (lift on %d of them: %+.4f)",
                 len(prompts), dc.prompt_split, base.mean(), len(lift_prompts),
                 float(lift_baseline.mean()))

        # 4 (model path). neuron activations of the pairs, one pass for every layer
        neuron_acts = None
        max_length = cfg.tracing.max_length or int(
            cache.manifest.get("config", {}).get("cache", {}).get("max_length") or 128)
        if source == "model":
            with ledger.step("tracing_activations"):
                _, tgt_docs, en_docs = paired_documents(cache, cfg.target, cfg.english,
                                                        cfg.selectivity.splits)
                text_of = {d["doc_id"]: d["text"] for d in cache.documents}
                neuron_acts = paired_mlp_activations_from_model(
                    model, tokenizer, [text_of[int(i)] for i in tgt_docs],
                    [text_of[int(i)] for i in en_docs], layers, cfg.tracing.reduction,
                    cfg.tracing.batch_size, max_length)
            log.info("neuron activations of %d pairs from the model (%d forward passes)",
                     len(tgt_docs), ledger.forwards["tracing_activations"])

        # 3–5 per layer
        from tqdm.auto import tqdm

        results: dict[int, LayerResult] = {}
        for layer in tqdm(layers, desc="localise layers", disable=not cfg.progress):
            results[layer] = analyse_layer(
                layer, sae_paths[layer], cfg=cfg, cache=cache, model=model,
                tokenizer=tokenizer, info=info, sets=sets, sets_digest=sets_digest,
                lift_prompts=lift_prompts, baseline=lift_baseline, neuron_acts=neuron_acts,
                ledger=ledger, tokenizer_digest=tok_digest, work_dir=work_dir)

        # 4. LAPE on the same source
        tc = cfg.tracing
        with ledger.step("lape"):
            lape_reused = False
            if source == "cache":
                probs = activation_probabilities_from_cache(cache, layers, None,
                                                            cfg.selectivity.splits)
            else:
                lape_texts = corpus_texts(cache, cfg.selectivity.splits, paired_only=False)
                # every language of the corpus: the same numbers for each target, so they are
                # kept beside the cache and the next target's localisation reads them
                key = {"model": info.fingerprint, "tokenizer": tok_digest, "layers": layers,
                       "texts": hashlib.sha256(json.dumps(lape_texts, sort_keys=True)
                                               .encode()).hexdigest(),
                       "batch_size": tc.batch_size, "max_length": max_length,
                       "active": "value", "dtype": info.dtype}
                probs, lape_reused = stored_activation_probabilities(
                    Path(cache.path) / "derived", key,
                    lambda: activation_probabilities_from_model(
                        model, tokenizer, lape_texts, layers, batch_size=tc.batch_size,
                        max_length=max_length))
            lape = probs.lape_neurons(tc.lape_entropy_quantile, tc.lape_prob_quantile)
    traced_t = {l: r.trace.target_neurons if r.trace is not None else [] for l, r in
                results.items()}
    traced_en = {l: r.trace.english_neurons if r.trace is not None else [] for l, r in
                 results.items()}
    overlap = {"target": lape_overlap(traced_t, lape[cfg.target]),
               "english": lape_overlap(traced_en, lape[cfg.english])}
    for layer, r in results.items():
        r.record["lape"] = {"target_neurons": lape[cfg.target][layer].tolist(),
                            "english_neurons": lape[cfg.english][layer].tolist(),
                            "overlap_target": overlap["target"]["per_layer"][layer],
                            "overlap_english": overlap["english"]["per_layer"][layer]}
    log.info("LAPE (%s): %d target / %d English neurons over the layers; traced N_t ∩ LAPE = "
             "%d, N_en ∩ LAPE = %d", source, overlap["target"]["total"]["n_lape"],
             overlap["english"]["total"]["n_lape"], overlap["target"]["total"]["intersection"],
             overlap["english"]["total"]["intersection"])

    # window
    _write_json(loc / "layers.json", {str(l): r.record for l, r in results.items()})
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
            _write_json(loc / "summary.json", {"format": FORMAT, "error": str(err),
                                               "layers": {str(l): r.record.get("k")
                                                          for l, r in results.items()}})
            raise LocaliseError(f"no window: {err} (per-layer results in "
                                f"{loc / 'layers.json'})") from err
    warnings += choice.warnings
    log.info("window: layers %s (score %s)%s", choice.layers, choice.score,
             " — FLAGGED: " + "; ".join(choice.warnings) if choice.flagged else "")

    # outputs
    with ledger.step("outputs"):
        sae_prov = {r.site: {"path": str(sae_paths[l]), "sha256": r.record.get("sae_sha256"),
                             "kind": r.record.get("sae_kind"),
                             "n_latents": r.record.get("n_latents")}
                    for l, r in results.items()}
        dir_meta = {"format": DIRECTIONS_FORMAT, "format_version": str(FORMAT_VERSION),
                    "target": cfg.target, "english": cfg.english,
                    "window": json.dumps(choice.layers), "layers": json.dumps(layers),
                    "model": json.dumps(_jsonable(info.to_dict())),
                    "saes": json.dumps({s: v["path"] for s, v in sae_prov.items()}),
                    "selectivity_reduction": cfg.selectivity.reduction,
                    "tracing_reduction": cfg.tracing.reduction}
        directions = write_directions(out / "directions.safetensors", results, choice.layers,
                                      dir_meta)
        files = {"summary": str(loc / "summary.json"), "layers": str(loc / "layers.json"),
                 "token_sets": str(loc / "token_sets.json"), "directions": str(directions)}
        if cfg.plots:
            if plots_dir.is_dir():  # no stale plots of layers a previous run analysed
                shutil.rmtree(plots_dir)
            files["plots"] = write_plots(plots_dir, results, choice)

    per_layer = {}
    for layer, r in results.items():
        row = {"k": r.ranking.k, "selected": r.ranking.selected.tolist(),
               "n_target_neurons": 0 if r.trace is None else int(r.trace.target_neurons.numel()),
               "n_english_neurons": 0 if r.trace is None
               else int(r.trace.english_neurons.numel()),
               "causal_gain": r.causal_gain,
               "causal_gain_direction": (r.record["causal_gain"] or {}).get("direction"),
               "typical_norm": r.scale, "n_pairs": r.codes.n_pairs,
               **_spectrum_row(r.spectrum),
               "neuron_spectrum": _spectrum_row(r.neuron_spectrum)
               if r.neuron_spectrum is not None else None,
               "top_features": r.top_features,
               "lape_overlap": {"target": overlap["target"]["per_layer"][layer],
                                "english": overlap["english"]["per_layer"][layer]},
               "in_window": layer in choice.layers}
        per_layer[str(layer)] = row
        warnings += r.record["warnings"]
    rank1 = [l for l, r in results.items()
             if r.spectrum is not None and _spectrum_row(r.spectrum)["essentially_rank1"]]
    findings = []
    if rank1:
        findings.append(f"the paired-difference spectrum is essentially rank 1 (the mean "
                        f"language shift: r = 1 and ‖Pμ‖/‖μ‖ ≥ {RANK1_ALIGNMENT}) at layers "
                        f"{rank1}")
    ledger.seconds["total"] = time.perf_counter() - started
    ledger.forwards["total"] = sum(v for k, v in ledger.forwards.items() if k != "total")
    prov = cache.manifest.get("config", {}).get("provenance", {}) or {}
    summary = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "target": cfg.target, "english": cfg.english, "layers_analysed": layers,
        "window": choice.to_dict(),
        "baseline": {"split": dc.prompt_split, "n_prompts": len(prompts), "steps": dc.steps,
                     "template": dc.template, "mean_delta_m": base.mean(),
                     "lift_prompts": len(lift_prompts),
                     "lift_prompts_mean_delta_m": float(lift_baseline.mean())},
        "layers": per_layer,
        "lape": {"source": source, "n_tokens": probs.n_tokens, "reused": lape_reused,
                 "target": overlap["target"]["total"], "english": overlap["english"]["total"]},
        "token_sets": {"sizes": sets.sizes, "tokenizer": sets.tokenizer,
                       "by_source": sets_json["by_source"]},
        "tracing_source": source,
        "n_pairs": len(pairs),
        "runtime_seconds": ledger.seconds,
        "forward_passes": ledger.forwards,
        "findings": findings,
        "warnings": list(dict.fromkeys(warnings)),
        "provenance": {
            "model": info.to_dict(),
            "tokenizer": tok_digest,
            "cache": {"path": str(Path(cfg.cache_dir).resolve()),
                      "config_hash": cache.manifest.get("config_hash"),
                      "model": prov.get("model"), "tokenizer": prov.get("tokenizer"),
                      "n_tokens": cache.n_tokens},
            "saes": sae_prov,
            "config": dataclasses.asdict(cfg),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "files": files,
    }
    _write_json(loc / "summary.json", summary)
    log.info("done in %.1f s (%d forward passes): window %s, K %s → %s",
             ledger.seconds["total"], ledger.forwards["total"], choice.layers,
             {l: r.ranking.k for l, r in results.items()}, loc / "summary.json")
    return _jsonable(summary)
