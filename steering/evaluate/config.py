"""Structured config of ``foxp2-steer`` (:class:`SteerAppConfig`), registered in Hydra's
ConfigStore as ``steer_schema``; ``conf/steer.yaml`` only chooses the model and overrides.

Same conventions as :mod:`steering.localise.config` (one dataclass per concern, one comment per
field, impossible values fail in ``__post_init__`` naming the key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from sae_train.config import ModelConfig, PathsConfig, register_configs
from steering.evaluate.harness import TUNING_OBJECTIVES
from steering.localise.config import _check
from steering.steer.artifact import MAX_STRENGTH

# --------------------------------------------------------------------------- foxp2-steer
@dataclass
class SteerTuningConfig:
    """(λ, β) per method: max mean ΔM on tuning prompts with mean KL_gen ≤ kl_budget on tuning
    target sentences (steering.evaluate.harness.tune_strengths)."""

    # nats/token, KL(steered ‖ base) averaged over the tokens of held-out target sentences
    # with the steer placed as in generation.
    kl_budget: float = 0.5
    # λ grid of every method's tuning (the push's strength).
    lams: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    # β grid (the English term's strength).
    betas: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # Tuning-split subsets (null: all of the split).
    n_prompts: Optional[int] = 16
    # Tuning target sentences for the KL budget (null: all of the split).
    n_sentences: Optional[int] = 16
    # The window is tuned too (DESIGN: the tuning split chooses λ, β and the window): the
    # primary method is tuned at the localised window and at every contiguous window of
    # `window_width` layers starting at 0, window_stride, 2·window_stride, …; the best one
    # (max ΔM within the budget) is the window of every windowed method. Null: keep the
    # localised window.
    window_width: Optional[int] = 3
    # Start layers of the window scan's candidates: 0, stride, 2·stride, …
    window_stride: int = 3
    # λ grid of that window scan, at β = 0 (null: the full lams × betas grid). Each candidate
    # window costs one tuning point per λ, so a short grid keeps the scan cheap; the chosen
    # window is then tuned on the full grid like every method.
    window_lams: Optional[list[float]] = None
    # The method the window scan tunes. Null: the primary, unless the primary is trained (a
    # learned steer: one training per candidate window); then caa_window when it is among the
    # methods (the window is the strongest rival's choice), else foxp2_neurons.
    window_method: Optional[str] = None
    # caa_layer's layer. Null: the localisation's best single-layer causal gain (a feature
    # push's gain, not CAA's). k: CAA is tuned (lams, same budget and objective) at the
    # analysed layers 0, k, 2k, … and at that layer, and the best layer wins (max objective
    # within the budget, else the smallest KL), so the single-layer baseline is as tuned as
    # the window methods.
    caa_layer_stride: Optional[int] = None
    # End a λ line (fixed β) at its first point over the budget: larger strengths only cost
    # more KL, so they could not be chosen (steering.evaluate.harness.tune_strengths). False:
    # measure the whole grid.
    stop_over_budget: bool = True
    # What a method's tuning maximises within the budget: "delta_m" (DESIGN: mean ΔM over the
    # first T steps) or "default" (a departure: the guarded DEFAULT rate of full-length
    # generations, ties by ΔM, so a push that loops is not chosen; a full decode per point;
    # with evaluation.relevance on, the relevance guard too, as the reported DEFAULT).
    # The window scan always ranks by ΔM.
    objective: str = "delta_m"
    # A fluency preference (a departure from DESIGN, like objective=default): with a budget
    # on the mean ΔNLL of the tuning sentences (steered − unsteered, nats/token, the steer
    # placed as in generation), the points within the KL budget that also meet it and work
    # (DEFAULT > 0, or ΔM > 0 for objective=delta_m) are preferred when there are any, else
    # every point within the KL budget competes as before. null: no preference; "bar": the
    # target's own ΔNLL bar (es 0.05, hi 0.10; none for other targets); or a number.
    nll_budget: Optional[str] = None

    def __post_init__(self):
        if self.nll_budget is not None and str(self.nll_budget) != "bar":
            try:
                ok = float(self.nll_budget) >= 0
            except ValueError:
                ok = False
            _check(ok, f"tuning.nll_budget={self.nll_budget!r}: use null, bar or a number ≥ 0")
        _check(self.objective in TUNING_OBJECTIVES,
               f"tuning.objective={self.objective!r}: use one of {list(TUNING_OBJECTIVES)}")
        _check(self.kl_budget > 0, f"tuning.kl_budget={self.kl_budget}: must be > 0")
        _check(bool(self.lams) and bool(self.betas), "tuning.lams and tuning.betas: non-empty")
        for key in ("lams", "betas", "window_lams"):
            bad = [v for v in getattr(self, key) or [] if not abs(float(v)) <= MAX_STRENGTH]
            _check(not bad, f"tuning.{key} holds {bad}: strengths must be finite and at most "
                            f"{MAX_STRENGTH:g} in size")
        _check(self.window_width is None or self.window_width >= 1,
               f"tuning.window_width={self.window_width}: ≥ 1 or null")
        _check(self.window_stride >= 1, f"tuning.window_stride={self.window_stride}: ≥ 1")
        _check(self.caa_layer_stride is None or self.caa_layer_stride >= 1,
               f"tuning.caa_layer_stride={self.caa_layer_stride}: ≥ 1 or null")
        _check(self.window_lams is None or len(self.window_lams) > 0,
               "tuning.window_lams=[] scans nothing; give λ values or null")


@dataclass
class SteerEvalConfig:
    """The evaluation split (steering.evaluate.harness)."""

    n_prompts: Optional[int] = None  # null: every evaluation prompt
    n_sentences: Optional[int] = None  # null: every held-out target sentence
    max_new_tokens: int = 32
    steps: int = 3  # T of ΔM
    batch_size: int = 16  # rows per full-vocabulary forward (held-out text, continuation NLL)
    gen_batch_size: int = 64  # rows per greedy decode (cheap in memory; big batches amortise)
    # Bootstrap resamples of every confidence interval.
    n_boot: int = 2000
    # The NLL fluency guard compares a steered continuation's NLL under the unsteered model
    # with the unsteered (English) continuation's. True (a stated departure from a plain
    # comparison): the allowance is raised by the language offset, the unsteered model's mean
    # NLL/token on the held-out target sentences minus that on their English counterparts
    # (demo model: es +0.42, hi +1.02), so fluent target text is not failed for being in the
    # target language. False: no offset.
    nll_guard_language_offset: bool = True
    # The "native" reference row (steering.evaluate.native): the unsteered model asked in the target
    # language (translated prompt and template), scored like every method: the DEFAULT the
    # guards allow this model. Not a baseline and not in the frontier. Prompts without a
    # translation are left out of that row (its n_prompts says how many it scored).
    native_reference: bool = True
    # Its template, with {prompt} (null: the built-in one of the target, steering.evaluate.native;
    # a target without one gets no native row).
    native_template: Optional[str] = None
    # Greedy decoding of every continuation (tuning included) with this repetition penalty,
    # as generate(do_sample=False, repetition_penalty=...) applies it; 1: plain greedy
    # (DESIGN's protocol). A sensitivity knob: a small base model loops under plain greedy.
    repetition_penalty: float = 1.0
    # ... and never repeating an n-gram of this size, as generate(no_repeat_ngram_size=...)
    # does (0: off).
    no_repeat_ngram_size: int = 0
    # The relevance guard (steering.evaluate.relevance): an answer counts for DEFAULT only if
    # the unsteered model finds it more likely after its own (translated) question than after
    # others, by at least τ nats/token; τ is the `relevance_quantile` of the native answers'
    # PMI on the tuning split (so the native row keeps ~95% of its passes). False: no guard.
    relevance: bool = True
    # τ = this quantile of the native tuning answers' PMI.
    relevance_quantile: float = 0.05
    # How many tuning prompts' native answers calibrate τ (null: the whole tuning split, 66 on
    # the embedded corpus). Not tuning.n_prompts: a 5% quantile of 16 answers is about their
    # minimum — sd 0.15 nats/token over draws of 16, biased up, and it moved the demo's Hindi τ
    # from 0.60 (bf16) to 0.81 (float32); docs/results.md, "The relevance threshold".
    relevance_prompts: Optional[int] = None
    relevance_others: int = 4  # other questions each answer is compared against
    # Also evaluate the final artifacts (and the none / native rows) under plain greedy
    # decoding, at their tuned strengths with no re-tuning: report.json's "plain_greedy" and a
    # second table in report.md. Ignored when the headline decoding is plain greedy already.
    plain_greedy_table: bool = False

    def __post_init__(self):
        _check(self.no_repeat_ngram_size >= 0,
               f"evaluation.no_repeat_ngram_size={self.no_repeat_ngram_size}: must be ≥ 0")
        _check(0 <= self.relevance_quantile < 1 and self.relevance_others >= 1,
               f"evaluation.relevance_quantile={self.relevance_quantile} (in [0, 1)), "
               f"evaluation.relevance_others={self.relevance_others} (≥ 1)")
        _check(self.relevance_prompts is None or self.relevance_prompts >= 2,
               f"evaluation.relevance_prompts={self.relevance_prompts}: must be ≥ 2 (or null: "
               "every tuning prompt)")
        _check(self.repetition_penalty > 0,
               f"evaluation.repetition_penalty={self.repetition_penalty}: must be > 0 (1: off)")
        _check(self.native_template is None or "{prompt}" in self.native_template,
               f"evaluation.native_template={self.native_template!r}: it must contain "
               "'{prompt}' (or be null: the built-in template of the target)")
        _check(self.batch_size >= 1 and self.gen_batch_size >= 1,
               f"evaluation.batch_size={self.batch_size}, evaluation.gen_batch_size="
               f"{self.gen_batch_size}: both must be ≥ 1")


@dataclass
class SteerLearnConfig:
    """Learned steers (steering.steer.learned; methods foxp2_learned, foxp2_learned_random,
    foxp2_learned_dense, lineas): trained once per method on the discovery split, then γ is
    chosen on the tuning split like every strength."""

    # Where the learned FOXP2 shift may act: "window" (the steering window's traced neurons)
    # or "traced" (the traced neurons of every analysed layer that has any).
    layers: str = "window"
    # Per layer, this many more neurons on top of the traced ones: those with the largest
    # FOXP2 contrast |μ_t − μ_en|/σ that tracing did not pick (foxp2_learned_random draws
    # as many more random ones). 0: the traced neurons only.
    extra_neurons: int = 0
    steps: int = 150  # Adam steps
    lr: float = 0.05  # on θ, in units of each neuron's activation std
    batch_size: int = 8  # teacher answers (and held-out sentences) per step
    first_tokens: int = 3  # the first answer tokens, weighted by first_weight
    # Weight of those first answer tokens in the NLL.
    first_weight: float = 4.0
    kl_weight: float = 1.0  # κ: KL(steered ‖ base) on discovery target sentences
    l1_weight: float = 0.002  # ρ: L1 on θ, a proximal step in Adam's metric
    # Teacher answer tokens scored per example.
    max_answer_tokens: int = 24
    init: str = "zero"  # "zero" or "contrast" (the FOXP2 push, in std units)
    # μ of the relevance hinge (steering.steer.learned.relevance_hinge): each teacher answer
    # must stay at least relevance_margin nats/token cheaper after its own question than after
    # another one, under the steer. 0: off.
    relevance_weight: float = 0.0
    relevance_margin: float = 0.5
    # Keep only native answers the harness's judge accepts (False: every non-empty one; for
    # models too small to pass the judge, such as the tiny test models).
    judge_teacher: bool = True
    # Prompt splits whose native answers teach the steer (never "evaluation").
    teacher_splits: list[str] = field(default_factory=lambda: ["discovery"])
    kl_sentences: int = 64  # discovery target sentences of the KL term
    # The KL term on the union of the unsteered top-k next tokens of every position of those
    # sentences, computed once (steering.steer.learned.HeldOutKL): a step costs about half.
    # Null: the exact KL over the whole vocabulary, its unsteered half recomputed every step.
    kl_top_k: Optional[int] = 64
    # γ candidates (tuned on the tuning split with the app's budget and objective).
    gammas: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.5])
    # LinEAS: Adam steps, learning rate, L1 weight, random projections of the SW loss.
    lineas_steps: int = 150
    # LinEAS: Adam learning rate.
    lineas_lr: float = 0.01
    # LinEAS: L1 weight on the maps (proximal step).
    lineas_l1_weight: float = 0.002
    # LinEAS: random projections of the sliced Wasserstein loss.
    lineas_projections: int = 256

    def __post_init__(self):
        _check(self.layers in ("window", "traced"),
               f"learn.layers={self.layers!r}: use window or traced")
        _check("evaluation" not in self.teacher_splits and self.teacher_splits,
               f"learn.teacher_splits={self.teacher_splits}: the evaluation split never "
               "teaches; use discovery and/or tuning")
        _check(self.gammas and all(g > 0 for g in self.gammas),
               f"learn.gammas={self.gammas}: give positive strengths")
        _check(self.extra_neurons >= 0,
               f"learn.extra_neurons={self.extra_neurons}: must be ≥ 0")
        _check(self.kl_sentences >= 1, f"learn.kl_sentences={self.kl_sentences}: must be ≥ 1")
        _check(self.kl_top_k is None or self.kl_top_k >= 1,
               f"learn.kl_top_k={self.kl_top_k}: must be ≥ 1 or null (the whole vocabulary)")


@dataclass
class FrontierConfig:
    """γ sweep for the KL–DEFAULT frontier and DEFAULT-vs-γ plots (a subset of the split)."""

    # Methods whose γ sweep is measured (a subset of the app's methods).
    methods: list[str] = field(default_factory=lambda: ["foxp2", "foxp2_neurons", "caa_layer",
                                                        "caa_window", "lape"])
    # γ values of the sweep.
    gammas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    # Evaluation prompts of the sweep.
    n_prompts: int = 24
    # Held-out target sentences of the sweep.
    n_sentences: int = 24


@dataclass
class WandbReportConfig:
    enabled: bool = True
    mode: str = "offline"
    project: str = "foxp2"


@dataclass
class SteerAppConfig:
    """`foxp2-steer`: build, tune and evaluate every method for one target (stage III)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    target: str = "es"
    english: str = "en"
    localise_dir: str = "${paths.root}/localise/${model.slug}-${target}"
    cache_dir: str = "${paths.root}/cache/${model.slug}-embedded"
    out_dir: str = "${paths.root}/steer/${model.slug}-${target}"
    # Methods (steering.steer.methods.REGISTRY); "none" is always evaluated (the reference).
    methods: list[str] = field(default_factory=lambda: [
        "prompting", "foxp2", "foxp2_neurons", "foxp2_pos", "foxp2_neg", "caa_layer",
        "caa_window", "lape", "random"])
    # The method the bars and the CLI's default artifact refer to.
    primary: str = "foxp2"
    # Positions: "prompt_end" (the prompt's last token + decode_steps generated tokens at full
    # strength, every later generated token at the fraction `sustain`) or "all".
    position: str = "prompt_end"
    # Generated tokens steered at full strength after the prompt end.
    decode_steps: int = 4
    # Strength of the steer on every later generated token (a fraction; 0: off).
    sustain: float = 0.0
    tuning: SteerTuningConfig = field(default_factory=SteerTuningConfig)
    evaluation: SteerEvalConfig = field(default_factory=SteerEvalConfig)
    frontier: FrontierConfig = field(default_factory=FrontierConfig)
    learn: SteerLearnConfig = field(default_factory=SteerLearnConfig)
    wandb: WandbReportConfig = field(default_factory=WandbReportConfig)
    # Reuse finished methods in <out_dir>/work/ whose inputs and settings are unchanged.
    resume: bool = True
    seed: int = 0
    num_threads: Optional[int] = None
    progress: bool = True

    def __post_init__(self):
        from steering.steer.methods import REGISTRY

        _check(self.target != self.english,
               f"target and english are both {self.target!r}: pick a target language")
        unknown = sorted(set(self.methods) - set(REGISTRY))
        _check(not unknown, f"methods: unknown {unknown}; use {list(REGISTRY)}")
        _check(self.primary in self.methods,
               f"primary={self.primary!r} is not among methods={self.methods}")
        _check(self.tuning.window_method is None or self.tuning.window_method in REGISTRY,
               f"tuning.window_method={self.tuning.window_method!r}: use one of "
               f"{list(REGISTRY)} or null")
        unknown = sorted(set(self.frontier.methods) - set(self.methods))
        _check(not unknown, f"frontier.methods {unknown} are not among methods={self.methods}")
        _check(self.position in ("prompt_end", "all"),
               f"position={self.position!r}: use prompt_end or all")
        _check(self.decode_steps >= 0, f"decode_steps={self.decode_steps}: must be ≥ 0")
        _check(0 <= self.sustain <= 1, f"sustain={self.sustain}: must be in [0, 1]")


def register_steer_configs() -> None:
    register_configs()
    ConfigStore.instance().store(name="steer_schema", node=SteerAppConfig)
