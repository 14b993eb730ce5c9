"""Contrastive activation addition (CAA): the residual mean difference (target − English
sentence means, discovery pairs of the activation cache).

``caa_layer``   added at one layer: the localisation's best single-layer causal gain, or — with
                ``tuning.caa_layer_stride`` — the layer whose tuned point ranks best among every
                stride-th analysed layer and that one (a search: :func:`search_caa_layer`).
``caa_window``  added at every window layer, each divided by |W|.
"""

from __future__ import annotations

import dataclasses
import logging

from steering.steer.artifact import LayerEdit, SteeringArtifact
from steering.steer.build import BuildError, Localisation, ResidualMeans
from steering.steer.methods.spec import BuildRequest, MethodSpec, Tuned, Tuner, Tuning

log = logging.getLogger(__name__)


def _means(request: BuildRequest, layers: list[int], method: str) -> dict:
    loc = request.localisation
    means = request.residual_means or ResidualMeans(None, loc.target, loc.english)
    return means(layers, method)


def build_caa_layer(request: BuildRequest) -> SteeringArtifact:
    loc = request.localisation
    layer = loc.best_causal_layer() if request.caa_layer is None else int(request.caa_layer)
    if layer not in loc.layers:
        raise BuildError(f"caa_layer={layer} was not analysed by the localisation "
                         f"(analysed: {loc.layers})")
    means = _means(request, [layer], "caa_layer")
    edit = LayerEdit(layer=layer, space="resid", add=means[layer].clone())
    return request.artifact("caa_layer", [edit], beta=0.0, layers=[layer])


def build_caa_window(request: BuildRequest) -> SteeringArtifact:
    means = _means(request, request.window, "caa_window")
    edits = [LayerEdit(layer=l, space="resid", add=means[l] / request.split)
             for l in request.window]
    return request.artifact("caa_window", edits, beta=0.0, layers=request.window)


def caa_candidate_layers(loc: Localisation, stride: int | None) -> list[int]:
    """caa_layer's candidate layers: every ``stride``-th analysed layer and the localisation's
    best causal layer (that one alone when the stride is None)."""
    best = loc.best_causal_layer()
    if stride is None:
        return [best]
    return sorted(set(sorted(loc.layers)[::stride]) | {best})


def search_caa_layer(request: BuildRequest, tuner: Tuner) -> Tuned:
    """caa_layer tuned (λ grid, same budget and objective as every method) at each candidate
    layer; the layer whose tuned point ranks best wins, by the rule within one layer. Without
    ``tuning.caa_layer_stride``: the best causal layer, tuned like every method."""
    stride = tuner.config.caa_layer_stride
    if stride is None:
        return tuner.tune(build_caa_layer(request), "lam")
    loc = request.localisation
    rows = []
    for layer in caa_candidate_layers(loc, stride):
        # built at the localised window (its |W| is only recorded in the provenance)
        tuned = tuner.tune(build_caa_layer(dataclasses.replace(
            request, window=list(loc.window), caa_layer=layer)), "lam")
        art = tuned.artifact
        chosen = next(p for p in tuned.points if p.lam == art.lam and p.beta == art.beta)
        rows.append((layer, tuned, chosen))
        log.info("caa_layer at layer %d: best λ=%g ΔM %+.4f KL %.4f%s", layer, art.lam,
                 chosen.delta_m, chosen.kl, "" if tuned.met_budget else " (budget not met)")
    # a layer that met no budget has its smallest-KL point, itself over the budget
    best = tuner.best([row[2] for row in rows])
    layer, tuned, _ = next(row for row in rows if row[2] is best)
    scan = [{"layer": l, **c.to_dict(), "within_budget": t.met_budget, "chosen": l == layer}
            for l, t, c in rows]
    log.info("caa_layer: layer %d (localisation's best causal layer: %d)", layer,
             loc.best_causal_layer())
    return Tuned(tuned.artifact, tuned.points, tuned.met_budget, {"layer_scan": scan})


CAA_LAYER = MethodSpec("caa_layer", build_caa_layer, Tuning("lam", search=search_caa_layer),
                       "residual mean difference at one (tuned) layer")
CAA_WINDOW = MethodSpec("caa_window", build_caa_window, Tuning("lam"),
                        "residual mean difference at every window layer, / |W|")
