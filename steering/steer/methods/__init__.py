"""The method registry: every steering method, how it is built and how it is tuned.

The contract (:mod:`steering.steer.methods.spec`): a method is a :class:`MethodSpec` —
``build(request: BuildRequest) -> SteeringArtifact`` at λ = β = 1, where the request carries the
localisation, the steering window, the placement, the seed, the CAA means, and (for methods
that learn or measure) the model, the tokenizer and the steer app's config; and
``tuning: Tuning`` — which strengths the evaluate stage's grid walks (``both``, ``lam``,
``beta``, or ``none``: used as built) and, optionally, a ``search(request, tuner) -> Tuned`` for
a method that chooses more than its strengths (caa_layer's layer).

Adding a method (e.g. a learned steer): write ``steering/steer/methods/<family>.py`` with its
build function and ``MethodSpec``, and add it to ``REGISTRY`` below. ``foxp2-steer`` accepts it in
``methods=[…]`` at once; the pipeline, the builder and the report need no edit.

Families: :mod:`.foxp2` (foxp2, foxp2_neurons, foxp2_replace, foxp2_pos, foxp2_neg),
:mod:`.caa` (caa_layer, caa_window), :mod:`.lape` (lape), :mod:`.controls` (none,
prompting, random), :mod:`.learned` (foxp2_learned, foxp2_learned_random, foxp2_learned_dense,
lineas).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch import Tensor

from steering.steer.artifact import SteeringArtifact
from steering.steer.build import BuildError, Localisation, ResidualMeans
from steering.steer.methods import caa, controls, foxp2, lape, learned
from steering.steer.methods.spec import (NO_TUNING, BuildRequest, MethodSpec, Placement, Tuned,
                                         Tuner, Tuning)

REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in (
    controls.NONE,
    controls.PROMPTING,
    foxp2.FOXP2,
    foxp2.FOXP2_NEURONS,
    foxp2.FOXP2_REPLACE,
    foxp2.FOXP2_POS,
    foxp2.FOXP2_NEG,
    caa.CAA_LAYER,
    caa.CAA_WINDOW,
    lape.LAPE,
    controls.RANDOM,
    learned.FOXP2_LEARNED,
    learned.FOXP2_LEARNED_RANDOM,
    learned.FOXP2_LEARNED_DENSE,
    learned.LINEAS,
)}

METHODS = tuple(REGISTRY)
# Which strengths each method tunes: "both" (λ, β grid), "lam", "beta" or "none".
TUNED = {name: spec.tuning.strengths for name, spec in REGISTRY.items()}
ABLATED_MODES = ("foxp2", "foxp2_neurons")

__all__ = ["ABLATED_MODES", "METHODS", "NO_TUNING", "REGISTRY", "TUNED", "BuildRequest",
           "MethodSpec", "Placement", "Tuned", "Tuner", "Tuning", "build", "build_method",
           "method_spec", "strengths_of"]


def method_spec(method: str) -> MethodSpec:
    """The registered spec of ``method`` (a BuildError naming the known ones otherwise)."""
    if method not in REGISTRY:
        raise BuildError(f"unknown method {method!r}; use one of {list(METHODS)}")
    return REGISTRY[method]


def strengths_of(method: str) -> str:
    """Which strengths ``method``'s tuning grid walks: "both", "lam", "beta" or "none"."""
    return method_spec(method).tuning.strengths


def build(method: str, request: BuildRequest) -> SteeringArtifact:
    """The artifact of ``method`` for ``request`` at λ = β = 1, after checking the request."""
    if request.ablation_of not in ABLATED_MODES:
        raise BuildError(f"ablation_of={request.ablation_of!r}: use foxp2 or foxp2_neurons")
    spec = method_spec(method)
    loc = request.localisation
    missing = sorted(set(request.window) - set(loc.layers))
    if missing:
        raise BuildError(f"window layers {missing} were not analysed by the localisation "
                         f"(analysed: {loc.layers})")
    return spec.build(request)


def build_method(method: str, loc: Localisation, *, cache_dir: str | Path | None = None,
                 window: Sequence[int] | None = None, seed: int = 0,
                 position: str = "prompt_end", decode_steps: int = 4, sustain: float = 0.0,
                 caa_means: dict[int, Tensor] | ResidualMeans | None = None,
                 saturating: bool = True, ablation_of: str = "foxp2",
                 caa_layer: int | None = None) -> SteeringArtifact:
    """The artifact of ``method`` at λ = β = 1, from keyword settings (a :class:`BuildRequest`
    built for you). ``ablation_of``: which FOXP2 mode ``foxp2_pos`` / ``foxp2_neg`` ablate
    (``foxp2`` or ``foxp2_neurons``). ``caa_layer``: the layer of ``caa_layer`` (None: the
    localisation's best single-layer causal gain). ``caa_means``: known CAA means (the rest
    are read from ``cache_dir``)."""
    means = caa_means if isinstance(caa_means, ResidualMeans) else \
        ResidualMeans(cache_dir, loc.target, loc.english, known=caa_means)
    request = BuildRequest(localisation=loc,
                           window=list(window) if window is not None else list(loc.window),
                           placement=Placement(position, decode_steps, sustain), seed=seed,
                           saturating=saturating, ablation_of=ablation_of, caa_layer=caa_layer,
                           residual_means=means)
    return build(method, request)
