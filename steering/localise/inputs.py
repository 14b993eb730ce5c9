"""The localisation's inputs, checked before anything is measured: the activation cache and its
languages, the analysed layers and their SAEs, where neuron activations come from, the corpus
texts, the discovery prompts' subsets; and the MLP activations of the pairs when the model has
to be run for them (``tracing.source=model``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from sae_train.cache.capture import capture_sites, run_capture
from sae_train.cache.manifest import CacheError
from sae_train.cache.reader import ActivationCache
from sae_train.cache.writer import pad_contexts, plan_contexts
from sae_train.models.sites import resolve_sites
from steering.language.defaultness import pad_token_id
from steering.localise.ledger import LocaliseError
from steering.localise.selectivity import paired_documents


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
    pad_id = pad_token_id(tokenizer)
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
