"""Structured config of ``foxp2-localise``, registered in Hydra's ConfigStore.

``foxp2-localise`` (:mod:`steering.apps.localise_app`) starts from ``localise_schema``
(:class:`LocaliseAppConfig`); ``conf/localise.yaml`` only chooses the model and overrides. A
misspelt key (``lift.top_n=8``) or a value of the wrong type fails when the app starts, naming
the key; values that are well-typed but impossible (``window.min_width=0``) fail in the
dataclasses' ``__post_init__`` with the key and what to do. One dataclass per stage of the
pipeline, one comment per field; defaults are the ones ``docs/results.md`` reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from sae_train.config import ModelConfig, PathsConfig, register_configs
from steering.language.defaultness import DEFAULT_TEMPLATE
from steering.localise.lift import DEFAULT_ALPHAS
from steering.localise.selectivity import REDUCTIONS
from steering.localise.spectra import MAX_GAP_INDEX, NULL_KINDS

SPLIT_NAMES = ("discovery", "tuning", "evaluation")


class LocaliseConfigError(ValueError):
    """A localise setting that cannot work (names the key and what to do)."""


def as_config(cfg, schema: type):
    """An app's DictConfig as its dataclass ``schema`` (an instance of it passes through)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_object(cfg)
    if not isinstance(cfg, schema):
        raise TypeError(f"cfg must be a {schema.__name__}; got {type(cfg).__name__}")
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LocaliseConfigError(message)


@dataclass
class TokenSetsConfig:
    """Language token sets V_t, V_en (steering.language.token_sets; rule in its module
    docstring)."""

    # Cache documents whose texts are counted (the corpus ratios): the discovery split.
    splits: list[str] = field(default_factory=lambda: ["discovery"])
    # Count only parallel documents (pair_id ≥ 0), so that unpaired prompts or general text
    # do not inflate one language's counts.
    paired_only: bool = True
    # One-vs-rest frequency ratio a language must reach over every rival.
    ratio: float = 3.0
    # Add-k smoothing of the token counts in those ratios.
    smoothing: float = 1.0
    # Tokens seen fewer times in the corpus are left to wordfreq (or to no language).
    min_count: int = 3
    # Decide tokens the corpus did not with wordfreq lists.
    use_wordfreq: bool = True
    # Smallest wordfreq Zipf frequency for a word to count as a language's.
    min_zipf: float = 3.0
    # Rival-only languages without texts (compete through wordfreq), e.g. [pt, it] for es.
    rivals: list[str] = field(default_factory=list)

    def __post_init__(self):
        _check(bool(self.splits) and set(self.splits) <= set(SPLIT_NAMES),
               f"token_sets.splits={self.splits}: use a non-empty subset of {list(SPLIT_NAMES)}")
        _check(self.ratio > 1, f"token_sets.ratio={self.ratio}: must be > 1 (one-vs-rest)")


@dataclass
class DefaultnessConfig:
    """ΔM over the first T greedy steps (steering.language.defaultness), on neutral English
    prompts."""

    # Greedy steps T.
    steps: int = 3
    # Prompt template of a base model.
    template: str = DEFAULT_TEMPLATE
    # Split of the embedded neutral prompts used for the baseline and the lift (discovery).
    prompt_split: str = "discovery"
    # Baseline ΔM on at most this many of them (null: all of the split).
    n_prompts: Optional[int] = None
    batch_size: int = 16

    def __post_init__(self):
        _check(self.steps >= 1, f"defaultness.steps={self.steps}: must be ≥ 1")
        _check(self.batch_size >= 1, f"defaultness.batch_size={self.batch_size}: must be ≥ 1")
        _check(self.prompt_split in SPLIT_NAMES,
               f"defaultness.prompt_split={self.prompt_split!r}: use one of {list(SPLIT_NAMES)}")
        _check(self.n_prompts is None or self.n_prompts >= 1,
               f"defaultness.n_prompts={self.n_prompts}: must be ≥ 1 or null")
        _check("{prompt}" in self.template,
               f"defaultness.template={self.template!r} has no '{{prompt}}' placeholder")


@dataclass
class SelectivityConfig:
    """Sel_j on the cache's discovery pairs (steering.localise.selectivity)."""

    # The variant that ranks features and feeds the spectra: "last" (last stored token of each
    # sentence) or "mean" (mean over its tokens). The other variant is computed and logged.
    reduction: str = "last"
    # Pair splits of the cache used for localisation.
    splits: list[str] = field(default_factory=lambda: ["discovery"])
    # ε in the denominator of Sel_j (keeps silent latents finite).
    eps: float = 1e-6
    # English features N_en of the steer (feature mode): the most English-selective latents
    # (Sel < 0), at most this many per layer.
    n_english: int = 16
    # Cache rows read and encoded at a time.
    chunk_tokens: int = 8192

    def __post_init__(self):
        _check(self.reduction in REDUCTIONS,
               f"selectivity.reduction={self.reduction!r}: use one of {list(REDUCTIONS)}")
        _check(bool(self.splits) and set(self.splits) <= set(SPLIT_NAMES),
               f"selectivity.splits={self.splits}: use a non-empty subset of {list(SPLIT_NAMES)}")


@dataclass
class LiftConfig:
    """Logit-mass lift by real intervention and the ranking (steering.localise.lift)."""

    # Pushes α relative to the layer's typical norm s_ℓ (h += α·s_ℓ·d_j).
    alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    # Screening size M: the top-M latents by Sel (Sel > 0) are verified by lift.
    top_m: int = 16
    # Discovery prompts the lift is measured on (a seeded subset of the baseline's prompts).
    n_prompts: int = 16
    # Rows (prompt × feature × α) per generation. Cost per layer: ceil(|α|·M·P / batch_size)
    # generations of T forward passes (defaults: 12 × 3 = 36 passes of 64 rows), plus one
    # generation per ceil(P / batch_size) for the causal gain.
    batch_size: int = 64
    # K: smallest k whose cumulative score reaches `saturation`, clipped to [min_k, max_k].
    saturation: float = 0.9
    # Fewest features K kept per layer.
    min_k: int = 1
    # Most features K kept per layer.
    max_k: int = 32
    # Single-layer causal gain of each layer: the ΔM lift of pushing "mean_direction" (the
    # normalised mean of the K selected unit decoder rows) or "top_feature" (the best-ranked
    # feature's decoder row) at that layer alone, at α = `causal_alpha` (null: the largest α).
    causal_gain: str = "mean_direction"
    # α of the single-layer causal gain (null: the largest α of the lift grid).
    causal_alpha: Optional[float] = None
    # Tokens sampled from the cache for the typical norm s_ℓ (median token norm).
    norm_tokens: int = 65536
    # Top tokens (logit lens) shown for each of the `n_top_features` best features.
    n_top_features: int = 5
    # Logit-lens tokens shown per feature.
    n_top_tokens: int = 8

    def __post_init__(self):
        _check(len(self.alphas) > 0 and all(a != 0 for a in self.alphas),
               f"lift.alphas={self.alphas}: give at least one non-zero α")
        _check(self.top_m >= 1 and self.n_prompts >= 1 and self.batch_size >= 1,
               f"lift.top_m, lift.n_prompts and lift.batch_size must be ≥ 1 (got {self.top_m}, "
               f"{self.n_prompts}, {self.batch_size})")
        _check(0 < self.saturation <= 1, f"lift.saturation={self.saturation}: must be in (0, 1]")
        _check(0 <= self.min_k <= self.max_k and self.max_k >= 1,
               f"lift.min_k={self.min_k}, lift.max_k={self.max_k}: need 0 ≤ min_k ≤ max_k, "
               "max_k ≥ 1")
        _check(self.causal_gain in ("mean_direction", "top_feature"),
               f"lift.causal_gain={self.causal_gain!r}: use mean_direction or top_feature")
        _check(self.causal_alpha is None or self.causal_alpha != 0,
               "lift.causal_alpha must be non-zero (or null: the largest α)")
        _check(self.n_top_features >= 1 and self.n_top_tokens >= 1,
               "lift.n_top_features and lift.n_top_tokens must be ≥ 1")


@dataclass
class TracingConfig:
    """Neuron tracing to the MLP of the same layer (steering.localise.tracing) and LAPE
    (steering.localise.lape)."""

    # Where the MLP-neuron activations (layers.{i}.mlp) come from: "auto" (the cache if it has
    # every needed mlp site, else the model), "cache" (error if missing) or "model" (always
    # run the model on the discovery pairs with hooks).
    source: str = "auto"
    # Per-sentence neuron activations: "mean" over the sentence's tokens (the contrast
    # E_tgt[c] − E_en[c] is an expectation over target text; one token is a noisy estimate of
    # it) or "last".
    reduction: str = "mean"
    # Tail rule (TailRule): robust z ≥ z_min, at most max_fraction of the layer's neurons
    # (and max_size if set), paired |t| ≥ t_min.
    z_min: float = 4.0
    # At most this fraction of the layer's neurons in each tail.
    max_fraction: float = 0.01
    # At most this many neurons in each tail (null: no cap).
    max_size: Optional[int] = None
    # Paired |t| a traced neuron must reach.
    t_min: float = 3.0
    # Fold Gemma's post-MLP norm scale into W_down.
    fold_post_norm: bool = True
    # Model path: documents per forward, token window (null: the cache's max_length).
    batch_size: int = 16
    # Token window of the model path (null: the cache's max_length).
    max_length: Optional[int] = None
    # LAPE's language neurons on the same activations (all cache languages, the analysed
    # layers together): the `lape` baseline's neurons and their overlap with the traced ones.
    # false skips it (≈ 30 s on the demo model; foxp2-demo compare=fast, which has no `lape`).
    lape: bool = True
    # LAPE: entropy quantile a language-specific neuron must stay under.
    lape_entropy_quantile: float = 0.01
    # LAPE: activation-probability quantile a language-specific neuron must reach.
    lape_prob_quantile: float = 0.95

    def __post_init__(self):
        _check(self.source in ("auto", "cache", "model"),
               f"tracing.source={self.source!r}: use auto, cache or model")
        _check(self.reduction in REDUCTIONS,
               f"tracing.reduction={self.reduction!r}: use one of {list(REDUCTIONS)}")
        _check(self.z_min > 0 and 0 < self.max_fraction <= 1 and self.t_min >= 0,
               f"tracing: need z_min > 0, 0 < max_fraction ≤ 1, t_min ≥ 0 (got {self.z_min}, "
               f"{self.max_fraction}, {self.t_min})")
        _check(0 < self.lape_entropy_quantile < 1 and 0 < self.lape_prob_quantile < 1,
               "tracing.lape_entropy_quantile and tracing.lape_prob_quantile must be in (0, 1)")


@dataclass
class SpectraConfig:
    """Difference spectra per layer (steering.localise.spectra)."""

    # Support N of the SAE-code spectrum: the K selected features, extended (when K is
    # smaller) by the next verified features in ranking order up to `min_support` columns —
    # a 1-column ΔZ would be rank 1 with Mass = Stab = 1 by construction.
    min_support: int = 8
    # Fix the rank r (null: the eigengap index i*).
    rank: Optional[int] = None
    # The eigengap i* is searched among the first this many singular values.
    max_gap_index: int = MAX_GAP_INDEX
    # Bootstrap resamples for the stability of the top-r subspace.
    n_boot: int = 50
    # Null models the spectra are compared with (shuffled pairs, random support).
    nulls: list[str] = field(default_factory=lambda: list(NULL_KINDS))
    # Draws of each null model.
    n_null: int = 5
    # Bootstrap resamples of each null draw.
    null_boot: int = 20

    def __post_init__(self):
        _check(self.min_support >= 1, f"spectra.min_support={self.min_support}: must be ≥ 1")
        _check(self.rank is None or self.rank >= 1, f"spectra.rank={self.rank}: ≥ 1 or null")
        _check(self.n_boot >= 1, f"spectra.n_boot={self.n_boot}: must be ≥ 1")
        unknown = sorted(set(self.nulls) - set(NULL_KINDS))
        _check(not unknown, f"spectra.nulls has unknown kinds {unknown}; use {list(NULL_KINDS)}")


@dataclass
class WindowConfig:
    """The steering window (steering.localise.window)."""

    # Contiguous windows of min_width…max_width layers (a 4-layer model needs min_width ≤ 4).
    min_width: int = 3
    # Widest window considered (layers).
    max_width: int = 6
    # Subtract a null's Mass·Stab ("random_support" or "shuffled_pairs"; null: none).
    null: Optional[str] = None
    # All layer scores zero: "raise" (after writing the per-layer results) or "flag".
    on_degenerate: str = "raise"

    def __post_init__(self):
        _check(1 <= self.min_width <= self.max_width,
               f"window.min_width={self.min_width}, window.max_width={self.max_width}: need "
               "1 ≤ min_width ≤ max_width")
        _check(self.null is None or self.null in NULL_KINDS,
               f"window.null={self.null!r}: use one of {list(NULL_KINDS)} or null")
        _check(self.on_degenerate in ("raise", "flag"),
               f"window.on_degenerate={self.on_degenerate!r}: use raise or flag")


@dataclass
class LocaliseAppConfig:
    """`foxp2-localise`: Neural FOXP2 stages I–II for one target language."""

    model: ModelConfig = field(default_factory=ModelConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # The activation cache (sae-cache) with layers.{i}.resid (and ideally layers.{i}.mlp).
    cache_dir: str = "${paths.root}/cache/${model.slug}-embedded"
    # Exported SAEs (sae-train): <sae_dir>/layers.{i}.resid/{cfg.json, sae.safetensors}.
    sae_dir: str = "${paths.root}/saes/${model.slug}-embedded"
    # Target language (a cache language code, e.g. es, hi) and the language it replaces.
    target: str = "es"
    english: str = "en"
    # Residual layers to analyse (null: every layer with both a cached resid site and an SAE).
    layers: Optional[list[int]] = None
    out_dir: str = "${paths.root}/localise/${model.slug}-${target}"
    # Reuse finished per-layer results in <out_dir>/localise/work/ whose inputs and settings
    # are unchanged (false: recompute everything and overwrite the outputs).
    resume: bool = False
    token_sets: TokenSetsConfig = field(default_factory=TokenSetsConfig)
    defaultness: DefaultnessConfig = field(default_factory=DefaultnessConfig)
    selectivity: SelectivityConfig = field(default_factory=SelectivityConfig)
    lift: LiftConfig = field(default_factory=LiftConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    spectra: SpectraConfig = field(default_factory=SpectraConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    # PNG plots: "all", "summary" (the spectra, window scores and top features; no per-layer
    # selectivity-vs-lift plots or neuron spectra: about 12 s less on the demo model), or
    # "none" (true/false are read as all/none).
    plots: str = "all"
    seed: int = 0
    # torch intra-op threads (null: torch's default).
    num_threads: Optional[int] = None
    # Progress bars (log lines are always written).
    progress: bool = True

    def __post_init__(self):
        self.plots = {"true": "all", "false": "none"}.get(str(self.plots).lower(),
                                                           str(self.plots).lower())
        _check(self.plots in ("all", "summary", "none"),
               f"plots={self.plots!r}: use all, summary or none")
        _check(self.target != self.english,
               f"target and english are both {self.target!r}: pick a target language")
        _check(self.layers is None or len(self.layers) > 0,
               "layers=[] selects nothing; give layer indices or null for all")
        _check(self.num_threads is None or self.num_threads >= 1,
               f"num_threads={self.num_threads}: must be ≥ 1 or null")


def register_localise_configs() -> None:
    """Register ``localise_schema`` (and the model group's schema) in the ConfigStore."""
    register_configs()  # model_schema, used by conf/model/*.yaml
    ConfigStore.instance().store(name="localise_schema", node=LocaliseAppConfig)
