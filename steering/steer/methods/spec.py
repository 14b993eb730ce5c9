"""The contract of a steering method: what it receives, what it returns, how it is tuned.

A method is one :class:`MethodSpec` in the registry (:mod:`steering.steer.methods`):

``build(request: BuildRequest) -> SteeringArtifact``
    The method's artifact at λ = β = 1 (γ = 1). The request carries the localisation (the
    files of one ``foxp2-localise`` run), the steering window, where the edit is placed in
    the sequence, the seed, and — for methods that need them — the activation cache's CAA
    means, the model and tokenizer, and the steer app's config. The artifact is the member
    λ = β = 1 of a family indexed by strength: ``artifact.with_strengths(lam, beta, gamma)``
    gives every other member, and the tuning below picks one.

``tuning: Tuning``
    ``Tuning(strengths=...)``: which strengths the evaluate stage's grid walks on the tuning
    split — ``"both"`` (the λ × β grid), ``"lam"`` (λ at β = 0), ``"beta"`` (β at λ = 0) or
    ``"none"`` (used as built, :data:`NO_TUNING`). The grid values, the KL budget and the
    objective are the app's ``tuning.*`` keys, the same for every method.
    ``Tuning(strengths=..., search=f)``: a method that searches more than strengths (e.g.
    caa_layer's layer) gives ``f(request, tuner) -> Tuned``; the evaluate stage passes its
    :class:`Tuner`, so the method tunes candidates with the same harness, budget and
    objective without importing the evaluate stage. What ``f`` returns in ``Tuned.record`` is
    stored beside the method's tuning points (provenance and report).

Adding a method: one module under ``steering/steer/methods/`` defining its ``MethodSpec`` s and
one line in the registry; the pipeline, the builder and the report need no edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

from steering.steer.artifact import LayerEdit, SteeringArtifact
from steering.steer.build import ResidualMeans
from steering.steer.localisation import Localisation

STRENGTHS = ("both", "lam", "beta", "none")
ROLES = ("foxp2", "baseline", "control")


@dataclass(frozen=True)
class Placement:
    """Where an edit acts: the prompt's last token and ``decode_steps`` generated tokens at full
    strength, later ones at ``sustain`` (``prompt_end``), or every position (``all``)."""

    position: str = "prompt_end"
    decode_steps: int = 4
    sustain: float = 0.0


@dataclass
class BuildRequest:
    """What a method's build function receives."""

    localisation: Localisation
    # The steering window (the localised one unless the steer stage's window scan chose another).
    window: list[int]
    placement: Placement = field(default_factory=Placement)
    seed: int = 0
    # Feature and neuron pushes saturate at the target's mean coordinate (artifact docstring).
    saturating: bool = True
    # The FOXP2 mode that foxp2_pos / foxp2_neg ablate: "foxp2" or "foxp2_neurons".
    ablation_of: str = "foxp2"
    # caa_layer's layer (None: the localisation's best single-layer causal gain).
    caa_layer: Optional[int] = None
    # CAA's residual mean differences (computed from the activation cache on first use).
    residual_means: Optional[ResidualMeans] = None
    # For methods that learn or measure on the model (None when building offline).
    model: Any = None
    tokenizer: Any = None
    # The steer app's config (steering.evaluate.config.SteerAppConfig) or None.
    config: Any = None
    # Learned methods: a function returning the teacher answers (a list of
    # steering.steer.learned.TeacherExample), made by the evaluate stage, which owns the judge
    # that accepts them; called on first use and cached there.
    teacher: Optional[Callable[[], list]] = None

    @property
    def split(self) -> int:
        """|W|: window methods divide a per-layer push by it."""
        return len(self.window)

    def artifact(self, method: str, edits: list[LayerEdit], *, lam: float = 1.0,
                 beta: float = 1.0, prompt_prefix: str = "", **details) -> SteeringArtifact:
        """The artifact of ``method`` with this request's placement and provenance."""
        loc, place = self.localisation, self.placement
        provenance = {**loc.provenance(), "window_split": self.split,
                      "saturating": self.saturating, **details}
        return SteeringArtifact(method=method, target=loc.target, english=loc.english,
                                edits=edits, lam=lam, beta=beta, position=place.position,
                                decode_steps=place.decode_steps, sustain=place.sustain,
                                prompt_prefix=prompt_prefix, provenance=provenance)


@dataclass
class Tuned:
    """A tuned artifact, the tuning points measured (the harness's TuningPoint), whether any
    point met the KL budget, and what a search adds to the record (e.g. ``layer_scan``)."""

    artifact: SteeringArtifact
    points: list
    met_budget: bool
    record: dict = field(default_factory=dict)


class Tuner(Protocol):
    """The evaluate stage's tuner, handed to a method's ``search``."""

    config: Any  # the app's tuning settings (steering.evaluate.config.SteerTuningConfig)

    def tune(self, artifact: SteeringArtifact, strengths: str) -> Tuned:
        """``artifact``'s strengths tuned on the tuning split (grid, budget, objective)."""

    def best(self, points: Sequence) -> Any:
        """The best of tuning points taken from several candidates (the same rule)."""


Search = Callable[[BuildRequest, Tuner], Tuned]


@dataclass(frozen=True)
class Tuning:
    """How a method is tuned (module docstring)."""

    strengths: str = "both"
    search: Optional[Search] = None

    def __post_init__(self):
        if self.strengths not in STRENGTHS:
            raise ValueError(f"Tuning(strengths={self.strengths!r}): use one of {STRENGTHS}")


NO_TUNING = Tuning("none")


@dataclass(frozen=True)
class MethodSpec:
    """One steering method: its name, how it is built, how it is tuned."""

    name: str
    build: Callable[[BuildRequest], SteeringArtifact]
    tuning: Tuning
    # One line for readers of the registry.
    summary: str = ""
    # When the primary method tuned β = 0, this method's tuning walks the primary's λ line
    # with the same edit (foxp2_pos): the pipeline shares the primary's result.
    same_as_primary_at_beta_zero: bool = False
    # The steer app's config section that shapes this method's artifact beyond the shared
    # settings (e.g. "learn"): part of the key its stored result is reused under.
    config_section: Optional[str] = None
    # What the method is to a reader of the results: "foxp2" (a FOXP2 variant), "baseline"
    # (a method from elsewhere that FOXP2 must beat) or "control" (an ablation or null that
    # says whether a part matters: never reported as the best baseline).
    role: str = "baseline"
    # The method reads LAPE's per-layer sets from the localisation: they are part of the key
    # its stored result is reused under (no other method's key holds them).
    reads_lape: bool = False

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"method {self.name!r}: role={self.role!r}; use one of {ROLES}")
