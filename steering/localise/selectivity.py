"""Feature selectivity on parallel pairs (Neural FOXP2 item 3).

For SAE latent j and parallel pairs k = 1…n (x_t,k a target-language sentence, x_en,k its
English translation), with per-sentence codes z_j(x)::

    Sel_j = (E_k[z_j(x_t,k)] − E_k[z_j(x_en,k)]) / (Std_tgt + Std_en + ε)

Means and standard deviations are over the n pairs (sample std, ``correction=1``; n ≥ 2).

The per-sentence code ``z(x)`` comes in two variants (``reduction``):

- ``"last"``: the code of the sentence's last stored token (the position that predicts what
  comes next);
- ``"mean"``: all tokens — each token is encoded, the codes are averaged over the sentence's
  tokens first, then the statistics are taken over pairs (so long sentences do not weigh more).

Codes come from cached activations (:class:`sae_train.cache.ActivationCache`) through any dense
``encode: (n, d_in) → (n, n_latents)`` function (an SAE's encoder; ``None``: the activations
themselves, e.g. MLP neurons for tracing). Sentences are matched into pairs by ``pair_id`` from
``cache.documents``; tokens are found by the per-token ``doc_id`` and ``position`` metadata and
read in chunks of ``chunk_tokens`` rows, so a cache far larger than memory streams through.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

REDUCTIONS = ("last", "mean")
Encode = Callable[[Tensor], Tensor]


@dataclass
class PairedCodes:
    """Per-sentence codes of parallel pairs: row k of ``target`` and ``english`` translate
    each other (pair ``pair_ids[k]``)."""

    target: Tensor  # (n_pairs, width) float32
    english: Tensor  # (n_pairs, width) float32
    pair_ids: np.ndarray  # (n_pairs,) int64, ascending
    target_doc_ids: np.ndarray  # (n_pairs,)
    english_doc_ids: np.ndarray  # (n_pairs,)
    site: str = "?"
    target_language: str = "?"
    english_language: str = "en"
    reduction: str = "last"
    splits: list[str] | None = None
    tokens_per_doc: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        return int(self.target.shape[0])

    def difference(self) -> Tensor:
        """``target − english``, (n_pairs, width): the paired differences of the spectra stage."""
        return self.target - self.english


# --------------------------------------------------------------------------- statistics
@dataclass
class Selectivity:
    """Per-latent selectivity and the statistics behind it (all ``(n_latents,)`` float32)."""

    sel: Tensor
    mean_target: Tensor
    mean_english: Tensor
    std_target: Tensor
    std_english: Tensor
    n_pairs: int
    reduction: str = "?"
    eps: float = 1e-6

    def top(self, k: int) -> Tensor:
        """Indices of the ``k`` most target-selective latents (descending Sel, stable)."""
        order = torch.sort(self.sel, descending=True, stable=True).indices
        return order[:k]

    def english_top(self, k: int) -> Tensor:
        """Indices of up to ``k`` most English-selective latents (ascending Sel, Sel < 0 only)."""
        order = torch.sort(self.sel, descending=False, stable=True).indices[:k]
        return order[self.sel[order] < 0]

    def to_dict(self, top: int = 50) -> dict:
        ids = self.top(top)
        return {
            "n_latents": int(self.sel.numel()), "n_pairs": self.n_pairs,
            "reduction": self.reduction, "eps": self.eps,
            "n_positive": int((self.sel > 0).sum()),
            "top": [{"feature": int(j), "sel": float(self.sel[j]),
                     "mean_target": float(self.mean_target[j]),
                     "mean_english": float(self.mean_english[j]),
                     "std_target": float(self.std_target[j]),
                     "std_english": float(self.std_english[j])} for j in ids.tolist()],
        }


def feature_selectivity(z_target: Tensor, z_english: Tensor, eps: float = 1e-6,
                        reduction: str = "?") -> Selectivity:
    """Sel_j = (mean_tgt − mean_en) / (std_tgt + std_en + eps) over paired rows.

    ``z_target``, ``z_english``: (n_pairs, n_latents), row k of both from the same pair.
    Statistics in float64, returned as float32 on the inputs' device.
    """
    if z_target.ndim != 2 or z_target.shape != z_english.shape:
        raise ValueError(f"z_target and z_english must both be (n_pairs, n_latents) with the "
                         f"same shape; got {tuple(z_target.shape)} and {tuple(z_english.shape)}")
    if z_target.shape[0] < 2:
        raise ValueError(f"selectivity needs at least 2 pairs for a standard deviation; got "
                         f"{z_target.shape[0]}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0 (got {eps}); it keeps dead latents at Sel = 0")
    zt, ze = z_target.double(), z_english.double()
    mean_t, mean_e = zt.mean(0), ze.mean(0)
    std_t, std_e = zt.std(0, correction=1), ze.std(0, correction=1)
    sel = (mean_t - mean_e) / (std_t + std_e + eps)
    return Selectivity(sel.float(), mean_t.float(), mean_e.float(), std_t.float(), std_e.float(),
                       n_pairs=int(zt.shape[0]), reduction=reduction, eps=eps)


# --------------------------------------------------------------------------- cache access
def paired_documents(cache, target: str, english: str = "en",
                     splits: Sequence[str] | None = ("discovery",)
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parallel pairs present in a cache: (pair_ids, target doc ids, English doc ids), ascending
    by pair id. Only documents with stored tokens count (a ``max_tokens`` cache may cut some)."""
    for lang in (target, english):
        if lang not in cache.languages:
            raise ValueError(f"language {lang!r} is not in the cache at {cache.path}; it has "
                             f"{cache.languages}")
    if target == english:
        raise ValueError(f"target and english are both {target!r}")
    splits = None if splits is None else list(splits)
    stored = set(np.unique(cache.metadata["doc_id"]).tolist())
    by_lang: dict[str, dict[int, int]] = {target: {}, english: {}}
    for doc in cache.documents:
        lang, pair = doc["language"], int(doc.get("pair_id", -1))
        if lang not in by_lang or pair < 0 or doc["doc_id"] not in stored:
            continue
        if splits is not None and doc["split"] not in splits:
            continue
        if pair in by_lang[lang]:
            raise ValueError(f"pair_id {pair} appears twice for language {lang!r} in the cache "
                             f"at {cache.path} (doc ids {by_lang[lang][pair]} and "
                             f"{doc['doc_id']}); pairs must be one sentence per language")
        by_lang[lang][pair] = int(doc["doc_id"])
    pairs = np.array(sorted(set(by_lang[target]) & set(by_lang[english])), dtype=np.int64)
    if len(pairs) == 0:
        raise ValueError(f"the cache at {cache.path} has no parallel {target}/{english} pairs in "
                         f"splits {splits or 'any'} ({len(by_lang[target])} {target} and "
                         f"{len(by_lang[english])} {english} paired documents)")
    tgt = np.array([by_lang[target][p] for p in pairs], dtype=np.int64)
    eng = np.array([by_lang[english][p] for p in pairs], dtype=np.int64)
    return pairs, tgt, eng


def document_codes(cache, site: str, doc_ids: Sequence[int], reduction: str = "last",
                   encode: Encode | None = None, chunk_tokens: int = 8192, device=None,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, np.ndarray]:
    """Per-document codes from a cache site: (codes ``(len(doc_ids), width)``, token counts).

    ``reduction="last"``: the code of the token with the largest ``position`` (a document
    cut into several cache windows repeats positions; then the last such row in cache order
    is used, and a warning counts those documents). ``"mean"``: the mean over the document's
    stored tokens of the per-token codes. ``encode``: dense ``(n, d_in) → (n, width)``; None
    keeps the activations. Rows are read and encoded ``chunk_tokens`` at a time on ``device``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; choose one of {REDUCTIONS}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be ≥ 1 (got {chunk_tokens})")
    cache.width(site)  # names the available sites if it is missing
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    if len(np.unique(doc_ids)) != len(doc_ids):
        raise ValueError("doc_ids must be unique")
    meta = cache.metadata
    rows = np.flatnonzero(np.isin(meta["doc_id"], doc_ids))
    order = np.argsort(doc_ids, kind="stable")
    slot = order[np.searchsorted(doc_ids, meta["doc_id"][rows], sorter=order)]  # row → output row
    counts = np.bincount(slot, minlength=len(doc_ids))
    if (counts == 0).any():
        missing = doc_ids[counts == 0][:5].tolist()
        raise ValueError(f"documents {missing} have no tokens at {site} in the cache at "
                         f"{cache.path}")
    positions = meta["position"][rows].astype(np.int64)
    # Sort by (slot, position, global row): the last entry of each slot is its last token.
    key = np.lexsort((rows, positions, slot))
    same = (np.diff(slot[key]) == 0) & (np.diff(positions[key]) == 0)
    if same.any():
        log.warning("%d of %d documents span several cache windows (repeated positions); "
                    "'last' takes the last such row in cache order",
                    len(np.unique(slot[key][1:][same])), len(doc_ids))
    device = torch.device("cpu") if device is None else torch.device(device)

    def encoded(idx: np.ndarray) -> Tensor:
        x = cache.gather(site, idx).to(device=device, dtype=dtype)
        if encode is None:
            return x
        with torch.no_grad():
            z = encode(x)
        if z.ndim != 2 or z.shape[0] != x.shape[0]:
            raise ValueError(f"encode must map (n, d_in) to dense (n, n_latents) codes; got "
                             f"{tuple(z.shape)} for input {tuple(x.shape)}")
        return z.to(dtype)

    if reduction == "last":
        ends = np.r_[np.flatnonzero(np.diff(slot[key])), len(key) - 1]
        last_rows, last_slots = rows[key][ends], slot[key][ends]
        read = np.argsort(last_rows, kind="stable")  # read forward through the shards
        out = None
        for start in range(0, len(read), chunk_tokens):
            part = read[start:start + chunk_tokens]
            z = encoded(last_rows[part])
            if out is None:
                out = torch.zeros(len(doc_ids), z.shape[1], dtype=dtype, device=device)
            out[torch.from_numpy(last_slots[part]).to(device)] = z
        return out, counts

    out = None
    for start in range(0, len(rows), chunk_tokens):
        z = encoded(rows[start:start + chunk_tokens])
        if out is None:
            out = torch.zeros(len(doc_ids), z.shape[1], dtype=torch.float64, device=device)
        out.index_add_(0, torch.from_numpy(slot[start:start + chunk_tokens]).to(device),
                       z.double())
    out /= torch.from_numpy(counts).to(device=device, dtype=torch.float64)[:, None]
    return out.to(dtype), counts


def paired_codes_from_cache(cache, site: str, target: str, english: str = "en",
                            splits: Sequence[str] | None = ("discovery",),
                            reduction: str = "last", encode: Encode | None = None,
                            chunk_tokens: int = 8192, device=None,
                            dtype: torch.dtype = torch.float32) -> PairedCodes:
    """Codes of every parallel (target, English) pair of the cache at ``site``.

    See :func:`paired_documents` (pairing) and :func:`document_codes` (reduction, encoding).
    """
    pairs, tgt_docs, en_docs = paired_documents(cache, target, english, splits)
    both = np.concatenate([tgt_docs, en_docs])
    codes, counts = document_codes(cache, site, both, reduction, encode, chunk_tokens,
                                   device, dtype)
    n = len(pairs)
    return PairedCodes(codes[:n], codes[n:], pairs, tgt_docs, en_docs, site=site,
                       target_language=target, english_language=english, reduction=reduction,
                       splits=None if splits is None else list(splits),
                       tokens_per_doc={target: counts[:n], english: counts[n:]})


def selectivity_from_cache(cache, site: str, encode: Encode, target: str, english: str = "en",
                           splits: Sequence[str] | None = ("discovery",),
                           reduction: str = "last", eps: float = 1e-6,
                           chunk_tokens: int = 8192, device=None
                           ) -> tuple[Selectivity, PairedCodes]:
    """Selectivity of every latent of ``encode`` at ``site`` on the cache's parallel pairs.

    Returns the :class:`Selectivity` and the :class:`PairedCodes` it was computed from (the
    spectra stage reuses them).
    """
    codes = paired_codes_from_cache(cache, site, target, english, splits, reduction, encode,
                                    chunk_tokens, device)
    return feature_selectivity(codes.target, codes.english, eps, reduction), codes
