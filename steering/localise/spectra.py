"""Difference spectra per layer (Neural FOXP2 item 6, first half).

For parallel pairs k = 1…n and a support N (selected latents or neurons; Π_N keeps those
columns), the paired differences are stacked **without centring**::

    ΔZ = [Π_N(z(x_t,k) − z(x_en,k))]_k          (n_pairs, |N|),   ΔZ = U Σ Vᵀ

so the mean difference μ shows up in the spectrum, and ‖Pμ‖/‖μ‖ says how much of the top
subspace is just that mean. Reported (σ_1 ≥ σ_2 ≥ …, 1-based indices):

- ``eigengap_index`` i* = argmax_{i ≤ min(12, len σ − 1)} σ_i / σ_{i+1} (a zero σ_{i+1} is
  floored at 1e-12·σ_1; the first maximum wins);
- ``r_eff`` = exp(−Σ_i p_i log p_i), p_i = σ_i² / Σ σ² (the exponential of the Shannon entropy of
  the normalised squared spectrum: 1 for a rank-1 ΔZ, m for m equal singular values);
- ``rank`` r = i* unless given; ``mass`` = Σ_{i≤r} σ_i² / Σ σ²;
- ``stability``: B bootstrap resamples of the pairs (with replacement, seeded); for each, the
  mean squared cosine of the principal angles between its top-r right-singular subspace and the
  full data's, ‖V_bᵀ V‖_F² / r; averaged over the B resamples (1 = the same subspace every time);
- ``mean_alignment`` = ‖P μ‖ / ‖μ‖, μ = mean row of ΔZ, P = V_r V_rᵀ.

Nulls, summarised at the **real** r so that masses compare: ``shuffled_pairs`` — differences of
non-matching pairs z(x_t,k) − z(x_en,π(k)) with π a random cyclic derangement (the language shift
μ survives, the pairing does not); ``random_support`` — the same statistics on random supports
of |N| columns drawn from all columns (needs the full-width codes; skipped when N is everything).

Large supports are handled through the n×n Gram matrix when n < |N| (the bootstrap then only
re-indexes it), so a 16k-latent layer costs one n×|N| product, not B big SVDs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

MAX_GAP_INDEX = 12
NULL_KINDS = ("shuffled_pairs", "random_support")


# --------------------------------------------------------------------------- building blocks
def difference_matrix(z_target: Tensor, z_english: Tensor,
                      support: Tensor | Sequence[int] | None = None) -> Tensor:
    """ΔZ = Π_N(z_target − z_english): (n_pairs, width) inputs → (n_pairs, |N|) float64."""
    if z_target.ndim != 2 or z_target.shape != z_english.shape:
        raise ValueError(f"z_target and z_english must be (n_pairs, width) with equal shapes; "
                         f"got {tuple(z_target.shape)} and {tuple(z_english.shape)}")
    delta = z_target.double() - z_english.double()
    if support is not None:
        support = torch.as_tensor(support, dtype=torch.long, device=delta.device).reshape(-1)
        if support.numel() == 0:
            raise ValueError("the support N is empty")
        if int(support.min()) < 0 or int(support.max()) >= delta.shape[1]:
            raise ValueError(f"support indices must lie in 0…{delta.shape[1] - 1}")
        delta = delta[:, support]
    return delta


class _Decomposition:
    """Singular values and the top right-singular vectors of ΔZ (n, m), in float64."""

    def __init__(self, delta: Tensor, method: str = "auto"):
        if method not in ("auto", "gram", "svd"):
            raise ValueError(f"method={method!r}; choose auto, gram or svd")
        self.delta = delta.double()
        n, m = self.delta.shape
        self.gram = n < m if method == "auto" else method == "gram"
        if self.gram:
            g = self.delta @ self.delta.T
            evals, evecs = torch.linalg.eigh(g)
            self.sigma = evals.flip(0).clamp(min=0).sqrt()
            self.u = evecs.flip(1)
            self.g = g
        else:
            u, s, vh = torch.linalg.svd(self.delta, full_matrices=False)
            self.sigma, self.u, self.vh = s, u, vh

    def right_vectors(self, r: int) -> Tensor:
        """V_r: (m, r) orthonormal columns (columns of zero σ are left zero)."""
        if not self.gram:
            return self.vh[:r].T
        s = self.sigma[:r]
        safe = torch.where(s > 0, s, torch.ones_like(s))
        return (self.delta.T @ self.u[:, :r]) / safe * (s > 0)


def singular_values(delta: Tensor) -> Tensor:
    """σ of ΔZ, descending, float64 (length min(n, m))."""
    return _Decomposition(delta).sigma[: min(delta.shape)]


def eigengap(sigma: Tensor, max_index: int = MAX_GAP_INDEX) -> tuple[int, Tensor]:
    """(i*, ratios): i* = 1-based argmax_{i ≤ min(max_index, len−1)} σ_i/σ_{i+1}."""
    sigma = sigma.double()
    if sigma.numel() == 0 or float(sigma[0]) <= 0:
        raise ValueError("all paired differences are zero: the spectrum is empty")
    if sigma.numel() == 1:
        return 1, torch.zeros(0, dtype=torch.float64)
    top = min(max_index, sigma.numel() - 1)
    floor = float(sigma[0]) * 1e-12
    ratios = sigma[:top] / sigma[1:top + 1].clamp(min=floor)
    return int(torch.argmax(ratios)) + 1, ratios


def effective_rank(sigma: Tensor) -> float:
    """exp(−Σ p_i log p_i), p_i = σ_i² / Σ σ² (0 log 0 = 0)."""
    p = sigma.double() ** 2
    p = p / p.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def top_mass(sigma: Tensor, r: int) -> float:
    """Σ_{i≤r} σ_i² / Σ σ²."""
    sq = sigma.double() ** 2
    return float(sq[:r].sum() / sq.sum())


def _stability(dec: _Decomposition, r: int, n_boot: int, generator: torch.Generator) -> float:
    """Mean over bootstrap resamples of ‖V_bᵀ V‖_F² / r (see the module doc)."""
    if n_boot <= 0:
        return float("nan")
    n = dec.delta.shape[0]
    v = dec.right_vectors(r)  # (m, r)
    dv = dec.delta @ v  # (n, r): rows of ΔZ in the full subspace's coordinates
    total = 0.0
    for _ in range(n_boot):
        idx = torch.randint(0, n, (n,), generator=generator)
        if dec.gram:
            evals, evecs = torch.linalg.eigh(dec.g[idx][:, idx])
            s = evals.flip(0)[:r].clamp(min=0).sqrt()
            u = evecs.flip(1)[:, :r]
            ok = s > s[0] * 1e-9 if float(s[0]) > 0 else torch.zeros_like(s, dtype=torch.bool)
            cross = (dv[idx].T @ u) / torch.where(ok, s, torch.ones_like(s)) * ok  # VᵀV_b
        else:
            _, _, vh = torch.linalg.svd(dec.delta[idx], full_matrices=False)
            cross = v.T @ vh[:r].T
        total += float((cross ** 2).sum()) / r
    return total / n_boot


def _mean_alignment(delta: Tensor, v: Tensor) -> float:
    mu = delta.mean(0)
    norm = float(mu.norm())
    return float((v.T @ mu).norm()) / norm if norm > 0 else float("nan")


def analyse_differences(delta: Tensor, rank: int | None = None, *,
                        max_gap_index: int = MAX_GAP_INDEX, n_boot: int = 50,
                        seed: int = 0, method: str = "auto") -> dict:
    """Every statistic of the module doc for one ΔZ (n_pairs, |N|); ``rank`` fixes r.
    ``method``: "gram" (n×n Gram matrix), "svd", or "auto" (Gram when n < |N|)."""
    if delta.ndim != 2 or min(delta.shape) < 1:
        raise ValueError(f"ΔZ must be a non-empty (n_pairs, |N|) matrix; got {tuple(delta.shape)}")
    dec = _Decomposition(delta, method)
    sigma = dec.sigma[: min(delta.shape)]
    i_star, ratios = eigengap(sigma, max_gap_index)
    r = i_star if rank is None else int(rank)
    if not 1 <= r <= sigma.numel():
        raise ValueError(f"rank {r} is outside 1…{sigma.numel()}")
    generator = torch.Generator().manual_seed(seed)
    v = dec.right_vectors(r)
    return {
        "sigma": sigma.cpu(), "eigengap_index": i_star, "gap_ratios": ratios.cpu(),
        "eigengap_ratio": float(ratios[i_star - 1]) if ratios.numel() else float("nan"),
        "r_eff": effective_rank(sigma), "rank": r, "mass": top_mass(sigma, r),
        "stability": _stability(dec, r, n_boot, generator),
        "mean_alignment": _mean_alignment(dec.delta, v),
    }


def cyclic_derangement(n: int, generator: torch.Generator) -> Tensor:
    """A random permutation π of 0…n−1 with no fixed point (one n-cycle); n ≥ 2."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 pairs")
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


# --------------------------------------------------------------------------- results
@dataclass
class NullSpectrum:
    """A null's statistics at the real rank r, averaged over ``n_draws`` draws."""

    kind: str
    n_draws: int
    rank: int
    mass: float
    stability: float
    r_eff: float
    mean_alignment: float
    eigengap_indices: list[int]
    sigma_normalised: Tensor  # mean over draws of σ / σ_1

    @property
    def mass_stab(self) -> float:
        return self.mass * self.stability

    def to_dict(self) -> dict:
        return {"kind": self.kind, "n_draws": self.n_draws, "rank": self.rank,
                "mass": self.mass, "stability": self.stability, "mass_stab": self.mass_stab,
                "r_eff": self.r_eff, "mean_alignment": self.mean_alignment,
                "eigengap_indices": self.eigengap_indices,
                "sigma_normalised": self.sigma_normalised.tolist()}


@dataclass
class LayerSpectrum:
    """Spectrum statistics of one layer's paired differences (definitions in the module doc)."""

    layer: int | None
    n_pairs: int
    support_size: int
    sigma: Tensor  # (min(n_pairs, |N|),) float64, descending
    eigengap_index: int
    eigengap_ratio: float
    gap_ratios: Tensor
    r_eff: float
    rank: int
    mass: float
    stability: float
    mean_alignment: float
    n_boot: int
    seed: int
    nulls: dict[str, NullSpectrum] = field(default_factory=dict)

    @property
    def mass_stab(self) -> float:
        return self.mass * self.stability

    @property
    def sigma_normalised(self) -> Tensor:
        return self.sigma / self.sigma[0]

    def to_dict(self) -> dict:
        return {
            "layer": self.layer, "n_pairs": self.n_pairs, "support_size": self.support_size,
            "sigma": self.sigma.tolist(), "eigengap_index": self.eigengap_index,
            "eigengap_ratio": self.eigengap_ratio, "gap_ratios": self.gap_ratios.tolist(),
            "r_eff": self.r_eff, "r_eff_definition": "exp(-sum p_i log p_i), p_i = s_i^2/sum s^2",
            "rank": self.rank, "mass": self.mass, "stability": self.stability,
            "mass_stab": self.mass_stab, "mean_alignment": self.mean_alignment,
            "n_boot": self.n_boot, "seed": self.seed,
            "nulls": {k: v.to_dict() for k, v in self.nulls.items()},
        }


def _null(kind: str, deltas: list[Tensor], r: int, n_boot: int, seed: int) -> NullSpectrum:
    stats = [analyse_differences(d, min(r, min(d.shape)), n_boot=n_boot, seed=seed + i)
             for i, d in enumerate(deltas)]
    width = max(s["sigma"].numel() for s in stats)
    normed = torch.zeros(width, dtype=torch.float64)
    for s in stats:
        normed[: s["sigma"].numel()] += s["sigma"] / s["sigma"][0]
    mean = lambda key: sum(s[key] for s in stats) / len(stats)  # noqa: E731
    return NullSpectrum(kind, len(stats), r, mean("mass"), mean("stability"), mean("r_eff"),
                        mean("mean_alignment"), [s["eigengap_index"] for s in stats],
                        normed / len(stats))


def layer_spectrum(z_target: Tensor, z_english: Tensor,
                   support: Tensor | Sequence[int] | None = None, *, layer: int | None = None,
                   rank: int | None = None, max_gap_index: int = MAX_GAP_INDEX,
                   n_boot: int = 50, seed: int = 0, nulls: Sequence[str] = NULL_KINDS,
                   n_null: int = 5, null_boot: int = 20) -> LayerSpectrum:
    """Spectrum of one layer's paired differences, with nulls.

    ``z_target``, ``z_english``: (n_pairs, width) per-sentence codes, row k of both from pair k
    (e.g. :class:`steering.localise.selectivity.PairedCodes`). ``support``: column indices N
    (None: all).
    ``n_boot`` resamples for stability (``null_boot`` for each of the ``n_null`` null draws);
    everything random is drawn from ``seed``.
    """
    unknown = sorted(set(nulls) - set(NULL_KINDS))
    if unknown:
        raise ValueError(f"unknown null kinds {unknown}; choose from {NULL_KINDS}")
    delta = difference_matrix(z_target, z_english, support)
    stats = analyse_differences(delta, rank, max_gap_index=max_gap_index, n_boot=n_boot,
                                seed=seed)
    r = stats["rank"]
    generator = torch.Generator().manual_seed(seed + 1)
    out: dict[str, NullSpectrum] = {}
    n, width = z_target.shape
    if "shuffled_pairs" in nulls and n >= 2 and n_null > 0:
        draws = []
        for _ in range(n_null):
            perm = cyclic_derangement(n, generator)
            draws.append(difference_matrix(z_target, z_english[perm], support))
        out["shuffled_pairs"] = _null("shuffled_pairs", draws, r, null_boot, seed + 100)
    size = delta.shape[1]
    if "random_support" in nulls and support is not None and size < width and n_null > 0:
        draws = []
        for _ in range(n_null):
            cols = torch.randperm(width, generator=generator)[:size]
            draws.append(difference_matrix(z_target, z_english, cols))
        out["random_support"] = _null("random_support", draws, r, null_boot, seed + 200)
    return LayerSpectrum(layer, n, size, stats["sigma"], stats["eigengap_index"],
                         stats["eigengap_ratio"], stats["gap_ratios"], stats["r_eff"], r,
                         stats["mass"], stats["stability"], stats["mean_alignment"], n_boot,
                         seed, out)


def layer_spectra(codes: Mapping[int, tuple[Tensor, Tensor]],
                  supports: Mapping[int, Tensor | Sequence[int] | None] | None = None,
                  **kwargs) -> dict[int, LayerSpectrum]:
    """:func:`layer_spectrum` for every layer of ``{layer: (z_target, z_english)}`` (or objects
    with ``.target``/``.english``); ``supports`` gives each layer's N (missing: all columns)."""
    result = {}
    for layer, pair in codes.items():
        zt, ze = (pair.target, pair.english) if hasattr(pair, "target") else pair
        support = None if supports is None else supports.get(layer)
        result[layer] = layer_spectrum(zt, ze, support, layer=layer, **kwargs)
    return result

