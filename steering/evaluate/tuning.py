"""The steer stage's searches on the tuning split: each method's tuning and the window scan.

:class:`HarnessTuner` is the :class:`~steering.steer.methods.spec.Tuner` every method is tuned
with (:func:`tune_method`): the harness's strength grid (:func:`steering.evaluate.harness.
tune_strengths`) with the app's budget, grid and objective, and the same rule to compare
candidates of a method's own search. :func:`choose_steer_window` tunes the primary method at
every candidate window and keeps the best.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from steering.evaluate.harness import (EvalSettings, HeldOutText, TuningPoint, best_point,
                                       tune_strengths)
from steering.language.token_sets import LanguageTokenSets
from steering.steer.artifact import SteeringArtifact
from steering.steer.localisation import Localisation
from steering.steer.methods import BuildRequest, Tuned, build, method_spec, strengths_of

log = logging.getLogger("foxp2-steer")


def content_key(obj) -> str:
    """A short digest of ``obj``'s JSON: the key a stored result is reused under."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class HarnessTuner:
    """Strengths tuned on the tuning split: prompts (ΔM, DEFAULT) and target sentences (KL)."""

    model: Any
    tokenizer: Any
    prompts: list[str]
    sentences: HeldOutText
    token_sets: LanguageTokenSets
    settings: EvalSettings
    identifiers: Any
    config: Any  # steering.evaluate.config.SteerTuningConfig
    # The relevance guard, applied by the "default" objective (None: not applied).
    relevance: Any = None
    # tuning.nll_budget resolved for the target (nats/token; None: no fluency preference).
    nll_budget: float | None = None

    def tune(self, artifact: SteeringArtifact, strengths: str) -> Tuned:
        cfg = self.config
        art, points, ok = tune_strengths(self.model, self.tokenizer, artifact, strengths,
                                         prompts=self.prompts, sentences=self.sentences,
                                         token_sets=self.token_sets, kl_budget=cfg.kl_budget,
                                         lams=cfg.lams, betas=cfg.betas, settings=self.settings,
                                         stop_over_budget=cfg.stop_over_budget,
                                         objective=cfg.objective, identifiers=self.identifiers,
                                         relevance=self.relevance, nll_budget=self.nll_budget)
        return Tuned(art, points, ok)

    def best(self, points: Sequence[TuningPoint]) -> TuningPoint:
        return best_point(points, self.config.objective)[0]


def tune_method(method: str, request: BuildRequest, tuner: HarnessTuner) -> Tuned:
    """``method`` built for ``request`` and tuned as its registry entry says."""
    spec = method_spec(method)
    if spec.tuning.search is not None:
        return spec.tuning.search(request, tuner)
    return tuner.tune(build(method, request), spec.tuning.strengths)


def candidate_windows(loc: Localisation, width: int | None, stride: int) -> list[list[int]]:
    """The localised window, then contiguous windows of ``width`` analysed layers."""
    out = [list(loc.window)]
    if width is None:
        return out
    layers = sorted(loc.layers)
    for start in range(layers[0], layers[-1] - width + 2, stride):
        w = list(range(start, start + width))
        if set(w) <= set(layers) and w not in out:
            out.append(w)
    return out


def _scan_window(primary: str, request: BuildRequest, tuner: HarnessTuner, window: list[int],
                 lams: Sequence[float], betas: Sequence[float]) -> dict:
    """The primary method at ``window``, tuned on the scan grid (ΔM objective): one scan row."""
    art = build(primary, dataclasses.replace(request, window=window))
    tuned, points, ok = tune_strengths(tuner.model, tuner.tokenizer, art, strengths_of(primary),
                                       prompts=tuner.prompts, sentences=tuner.sentences,
                                       token_sets=tuner.token_sets,
                                       kl_budget=tuner.config.kl_budget, lams=lams, betas=betas,
                                       settings=tuner.settings,
                                       stop_over_budget=tuner.config.stop_over_budget)
    best = next(p for p in points if p.lam == tuned.lam and p.beta == tuned.beta)
    log.info("window %s: best λ=%g β=%g ΔM %+.4f KL %.4f%s", window, tuned.lam, tuned.beta,
             best.delta_m, best.kl, "" if ok else " (budget not met)")
    return {"window": window, "lam": tuned.lam, "beta": tuned.beta, "delta_m": best.delta_m,
            "kl": best.kl, "within_budget": ok,
            "localised": window == list(request.localisation.window)}


def window_scan_method(primary: str, window_method: str | None,
                       methods: Sequence[str] = ()) -> str:
    """``window_method``, else the primary, unless the primary is trained (its registry entry
    reads a config section, e.g. ``learn``): a learned steer would be trained once per
    candidate window. Then the window goes to the strongest windowed baseline, caa_window when
    the run has it (the window is chosen for the rival, not for FOXP2), else FOXP2's push on
    the same traced neurons."""
    if window_method is not None:
        return window_method
    if not method_spec(primary).config_section:
        return primary
    return "caa_window" if "caa_window" in methods else "foxp2_neurons"


def choose_steer_window(primary: str, request: BuildRequest, tuner: HarnessTuner, *,
                        window_width: int | None, window_stride: int,
                        window_lams: Sequence[float] | None, resume: bool, work: Path,
                        base_key: dict, window_method: str | None = None,
                        methods: Sequence[str] = ()) -> tuple[list[int], list[dict]]:
    """Tune the scan's method (:func:`window_scan_method`) at every candidate window; the best
    (max ΔM within the KL budget, else the smallest KL) is the steering window. Cached in
    work/window.json."""
    loc = request.localisation
    cands = candidate_windows(loc, window_width, window_stride)
    primary = window_scan_method(primary, window_method, methods)
    if len(cands) == 1 or strengths_of(primary) == "none":
        return cands[0], []
    key = content_key({**base_key, "windows": cands, "primary": primary})
    done = work / "window.json"
    if resume and done.is_file():
        stored = json.loads(done.read_text())
        if stored.get("key") == key:
            log.info("window: reused %s → %s", done, stored["window"])
            return stored["window"], stored["scan"]
    # the short scan grid (tuning.window_lams at β = 0); a β-only primary keeps its β grid
    short = window_lams is not None and strengths_of(primary) != "beta"
    scan_lams = window_lams if short else tuner.config.lams
    scan_betas = [0.0] if short else tuner.config.betas
    scan = [_scan_window(primary, request, tuner, w, scan_lams, scan_betas) for w in cands]
    ok = [r for r in scan if r["within_budget"]]
    chosen = max(ok, key=lambda r: r["delta_m"]) if ok else min(scan, key=lambda r: r["kl"])
    done.write_text(json.dumps({"key": key, "window": chosen["window"], "scan": scan}))
    log.info("steering window %s (localised: %s)", chosen["window"], loc.window)
    return chosen["window"], scan
