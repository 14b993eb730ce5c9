"""The steering window: a contiguous block of 3–6 layers (Neural FOXP2 item 6, second half).

Each layer ℓ has a value v_ℓ = Mass_ℓ · Stab_ℓ (:class:`steering.localise.spectra.LayerSpectrum`)
and, optionally, a null value n_ℓ (a null's Mass·Stab at the same rank). Off by default: the
random-support null asks "is this support special?", a fair contrast; the shuffled-pair null
keeps the mean language shift μ, so where μ dominates (the clearest layers) it is nearly as
high as the real value and subtracting it would penalise exactly those layers — read it as a
diagnostic, or opt in knowingly. A candidate window W
(consecutive layer indices, all present, ``min_width ≤ |W| ≤ max_width``) scores::

    score(W) = mean_{ℓ∈W} v_ℓ  −  mean_{ℓ∈W} n_ℓ          (the second term only with a null)

The **mean**, not the sum: a sum grows with every added layer, so it always picks the widest
window. With the mean, a wider window wins only if its extra layers are as good as the ones it
already has. The best score wins; scores within ``tie_tol`` (absolute, plus 1e-9 relative) of
the best are ties, broken toward the **narrowest** window (fewer edited layers), then the
earliest start.

Degenerate inputs are never silently resolved: if every v_ℓ is zero (or not finite) there is
nothing to localise — :class:`WindowError` is raised (``on_degenerate="flag"`` returns a
choice with ``layers == []`` and ``flagged`` set instead); if all candidates tie, or the best
score is ≤ 0 (no better than the null), the choice is made but flagged with the reason.

Every candidate is logged (and kept in :attr:`WindowChoice.candidates`) with its score and each
of its layers' single-layer causal gain (passed in, e.g. ΔM gain of steering that layer alone).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping

log = logging.getLogger(__name__)


class WindowError(ValueError):
    """No window can be chosen (too few layers, or nothing to localise)."""


@dataclass
class WindowCandidate:
    """One contiguous window and its score."""

    start: int
    end: int  # inclusive
    score: float
    mean_value: float
    mean_null: float | None
    values: list[float]
    causal_gain: list[float | None]

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.end + 1))

    @property
    def width(self) -> int:
        return self.end - self.start + 1

    def to_dict(self) -> dict:
        gains = [g for g in self.causal_gain if g is not None]
        return {"layers": self.layers, "start": self.start, "end": self.end,
                "width": self.width, "score": self.score, "mean_mass_stab": self.mean_value,
                "mean_null": self.mean_null, "mass_stab": self.values,
                "causal_gain": self.causal_gain,
                "mean_causal_gain": sum(gains) / len(gains) if gains else None}


@dataclass
class WindowChoice:
    """The chosen window (``layers`` empty only when flagged as degenerate) and all candidates."""

    layers: list[int]
    score: float | None
    candidates: list[WindowCandidate]
    layer_values: dict[int, float]
    null_values: dict[int, float] | None
    causal_gain: dict[int, float]
    rule: dict
    flagged: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def start(self) -> int | None:
        return self.layers[0] if self.layers else None

    @property
    def end(self) -> int | None:
        return self.layers[-1] if self.layers else None

    def to_dict(self) -> dict:
        return {
            "layers": self.layers, "start": self.start, "end": self.end, "score": self.score,
            "flagged": self.flagged, "warnings": self.warnings, "rule": self.rule,
            "mass_stab": {str(k): v for k, v in self.layer_values.items()},
            "null": None if self.null_values is None
            else {str(k): v for k, v in self.null_values.items()},
            "causal_gain": {str(k): v for k, v in self.causal_gain.items()},
            "candidates": [c.to_dict() for c in self.candidates],
        }


def choose_window(layer_values: Mapping[int, float], null_values: Mapping[int, float] | None = None,
                  causal_gain: Mapping[int, float] | None = None, *, min_width: int = 3,
                  max_width: int = 6, tie_tol: float = 1e-9,
                  on_degenerate: str = "raise") -> WindowChoice:
    """Choose the window by the mean score (rule in the module doc).

    ``layer_values``: {layer: Mass·Stab}. ``null_values``: {layer: the null's Mass·Stab}
    (subtracted as a mean; must cover every layer). ``causal_gain``: {layer: single-layer
    causal gain}, logged with the candidates. ``on_degenerate``: "raise" or "flag".
    """
    if on_degenerate not in ("raise", "flag"):
        raise ValueError(f"on_degenerate={on_degenerate!r}; choose 'raise' or 'flag'")
    if not 1 <= min_width <= max_width:
        raise ValueError(f"need 1 ≤ min_width ≤ max_width; got {min_width}, {max_width}")
    values = {int(k): float(v) for k, v in layer_values.items()}
    nulls = None if null_values is None else {int(k): float(v) for k, v in null_values.items()}
    gains = {int(k): float(v) for k, v in (causal_gain or {}).items()}
    if nulls is not None and set(values) - set(nulls):
        raise WindowError(f"null values missing for layers {sorted(set(values) - set(nulls))}")
    rule = {"score": "mean(mass*stab)" + (" - mean(null)" if nulls is not None else ""),
            "min_width": min_width, "max_width": max_width, "tie_tol": tie_tol,
            "ties": "narrowest, then earliest"}
    layers = sorted(values)
    candidates: list[WindowCandidate] = []
    for start in layers:
        for width in range(min_width, max_width + 1):
            window = list(range(start, start + width))
            if any(l not in values for l in window):
                break  # not contiguous (or past the last layer): wider ones are not either
            vals = [values[l] for l in window]
            mean_value = sum(vals) / width
            mean_null = None if nulls is None else sum(nulls[l] for l in window) / width
            score = mean_value - (mean_null or 0.0)
            candidates.append(WindowCandidate(start, start + width - 1, score, mean_value,
                                              mean_null, vals, [gains.get(l) for l in window]))
    if not candidates:
        raise WindowError(f"no contiguous run of {min_width} layers among {layers}: cannot form a "
                          f"window of {min_width}–{max_width} layers")
    for c in candidates:
        log.info("window %d–%d (width %d): score %.4g, mean Mass·Stab %.4g, causal gain %s",
                 c.start, c.end, c.width, c.score, c.mean_value, c.causal_gain)

    warnings: list[str] = []
    if all(not math.isfinite(v) or v == 0 for v in values.values()):
        message = (f"all layer scores (Mass·Stab) are zero or not finite for layers {layers}: "
                   "there is nothing to localise (no window is better than another)")
        if on_degenerate == "raise":
            raise WindowError(message + "; pass on_degenerate='flag' to get the candidates")
        log.warning(message)
        return WindowChoice([], None, candidates, values, nulls, gains, rule, True, [message])
    finite = [c for c in candidates if math.isfinite(c.score)]
    if not finite:
        raise WindowError("every candidate window's score is not finite")
    best_score = max(c.score for c in finite)
    tol = tie_tol + 1e-9 * abs(best_score)
    tied = [c for c in finite if c.score >= best_score - tol]
    best = min(tied, key=lambda c: (c.width, c.start))
    if len(tied) == len(candidates) and len(candidates) > 1:
        warnings.append("all candidate windows have the same score: the narrowest earliest was "
                        "taken, but the data do not localise a window")
    if best_score <= 0:
        warnings.append(f"the best window's score is {best_score:.4g} ≤ 0: no better than the "
                        "null")
    for w in warnings:
        log.warning(w)
    log.info("chosen window %d–%d, score %.4g", best.start, best.end, best.score)
    return WindowChoice(best.layers, best.score, candidates, values, nulls, gains, rule,
                        bool(warnings), warnings)


def window_from_spectra(spectra: Mapping[int, object], null: str | None = None,
                        causal_gain: Mapping[int, float] | None = None, **kwargs) -> WindowChoice:
    """:func:`choose_window` from ``{layer: LayerSpectrum}``; ``null`` names the null whose
    Mass·Stab is subtracted ("random_support" or "shuffled_pairs"; None, the default: none)."""
    values = {layer: s.mass_stab for layer, s in spectra.items()}
    nulls = None
    if null is not None:
        missing = [layer for layer, s in spectra.items() if null not in s.nulls]
        if missing:
            raise WindowError(f"layers {missing} have no {null!r} null; compute it or pass "
                              "null=None")
        nulls = {layer: s.nulls[null].mass_stab for layer, s in spectra.items()}
    return choose_window(values, nulls, causal_gain, **kwargs)
