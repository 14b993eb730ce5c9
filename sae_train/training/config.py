"""Structured configs of `sae-train`, registered in Hydra's ConfigStore.

The primary config ``train.yaml`` starts from ``train_schema``; the groups ``sae``, ``trainer``
and ``logger`` start from their own schemas, so a misspelt key (``sae.kk=3``) or a key of another
architecture (``sae.l1_coefficient`` with ``sae=topk``) fails at start, naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sae_train.config import PathsConfig, require_int
from sae_train.saes import BatchTopKConfig, JumpReLUConfig, ReLUConfig, TopKConfig


@dataclass
class LoaderConfig:
    """How batches are read from the activation cache (ActivationDataModule)."""

    # Tokens per batch on each rank (the global batch is batch_size × world size).
    batch_size: int = 4096
    # Cache splits to train on (None: every split not used for validation).
    train_splits: Optional[list[str]] = None
    # Held-out splits for validation metrics (None or []: no validation).
    val_splits: Optional[list[str]] = field(default_factory=lambda: ["evaluation"])
    # Only tokens of these languages (None: all).
    languages: Optional[list[str]] = None
    shuffle: bool = True
    # Shuffle granularity (see sae_train.cache.datamodule.rank_token_order).
    block_tokens: int = 1024
    window_tokens: int = 262144
    # Batches read ahead on a background thread.
    prefetch: int = 4
    # Tokens sampled before training to estimate the input scale and b_dec.
    stats_tokens: int = 32768
    # Check each cache shard's sha256 the first time training reads it (once per run).
    verify: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "block_tokens", "window_tokens", "stats_tokens"):
            require_int(f"loader.{name}", getattr(self, name), low=1)
        require_int("loader.prefetch", self.prefetch, low=0)


@dataclass
class OptimConfig:
    """Adam and the schedules."""

    # None: 2e-4 / sqrt(n_latents / 2**14).
    lr: Optional[float] = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Fused Adam kernel; null: wherever torch supports it (CPU/CUDA float parameters).
    fused: Optional[bool] = None
    # Linear learning-rate warm-up.
    warmup_steps: int = 100
    # Decay the learning rate linearly to 0 over this final fraction of the run (0: constant).
    decay_fraction: float = 0.0
    # relu / jumprelu: ramp the sparsity penalty from 0 over this many steps.
    sparsity_warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optim.lr={self.lr!r}: must be a positive number, or null for "
                             "the default")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)!r}: two numbers in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"optim.eps={self.eps!r}: must be positive")
        require_int("optim.warmup_steps", self.warmup_steps, low=0)
        require_int("optim.sparsity_warmup_steps", self.sparsity_warmup_steps, low=0)
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction={self.decay_fraction!r}: must be in [0, 1]")


@dataclass
class MetricsConfig:
    # Pool and log training FVU / explained variance / L0 every this many steps.
    every_n_steps: int = 50
    # A latent is dead when it has not fired for this many training tokens (AuxK mask); the
    # dead fraction and feature-density histogram are computed over windows of this size.
    dead_after_tokens: int = 10_000_000
    # Bins of the log10 feature-density histogram.
    histogram_bins: int = 50

    def __post_init__(self) -> None:
        require_int("metrics.every_n_steps", self.every_n_steps, low=1)
        require_int("metrics.dead_after_tokens", self.dead_after_tokens, low=1)
        require_int("metrics.histogram_bins", self.histogram_bins, low=1)


@dataclass
class CheckpointConfig:
    """Lightning checkpoints (full training state, for exact resume)."""

    dir: str = "${out_dir}/checkpoints"
    # Save every this many optimizer steps (and last.ckpt at the end).
    every_n_steps: int = 1000
    # null: start fresh; "auto": resume from <dir>/last.ckpt if it exists; or a .ckpt path.
    resume: Optional[str] = None

    def __post_init__(self) -> None:
        require_int("checkpoint.every_n_steps", self.every_n_steps, low=1)


@dataclass
class ExportConfig:
    """The trained SAEs, written at the end of fit as <dir>/<site>/{cfg.json, sae.safetensors}."""

    dir: str = "${out_dir}"
    # float32, bfloat16 or float16.
    dtype: str = "float32"
    # Also log each exported folder to wandb as a model artifact (wandb logger only).
    wandb_artifact: bool = False
    # native: our cfg.json + sae.safetensors (read by load_sae; TopK also by sparsify);
    # saelens: cfg.json + sae_weights.safetensors for sae_lens.SAE.load_from_disk (every kind;
    # batchtopk as jumprelu with its threshold); sparsify: sparsify's own layout (topk only).
    format: str = "native"

    def __post_init__(self) -> None:
        from sae_train.saes.io import EXPORT_FORMATS

        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"export.dtype={self.dtype!r}: use float32, bfloat16 or float16")
        if self.format not in EXPORT_FORMATS:
            raise ValueError(f"export.format={self.format!r}: use one of "
                             f"{', '.join(EXPORT_FORMATS)}")


@dataclass
class SplicedEvalConfig:
    """Every N steps: CE loss / KL of the model with the SAE's reconstruction spliced in."""

    enabled: bool = False
    every_n_steps: int = 1000
    # Held-out documents of the cache (documents.jsonl) from these splits.
    splits: list[str] = field(default_factory=lambda: ["evaluation"])
    max_documents: int = 64
    batch_size: int = 8
    max_length: int = 128
    # The model to splice into; None: the model recorded in the cache manifest.
    model_name: Optional[str] = None
    model_dtype: str = "float32"
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "max_documents", "batch_size", "max_length"):
            require_int(f"eval.{name}", getattr(self, name), low=1)


@dataclass
class TrainerConfig:
    """Arguments of lightning.pytorch.Trainer that the configs set (Lightning owns the rest)."""

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    # 32-true, bf16-mixed (autocast), 16-mixed, ..., or auto: bf16-mixed where the hardware
    # computes bf16 (a bf16 GPU; a CPU with AVX512-BF16 or AMX), else 32-true.
    precision: Any = "32-true"
    max_steps: int = -1
    max_epochs: Optional[int] = 1
    val_check_interval: Any = 1.0
    check_val_every_n_epoch: Optional[int] = 1
    limit_val_batches: Any = 1.0
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 50
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1
    deterministic: Any = False
    benchmark: Optional[bool] = None
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    # Ranks read disjoint parts of the cache themselves (ActivationDataModule).
    use_distributed_sampler: bool = False
    default_root_dir: Optional[str] = "${out_dir}"


@dataclass
class WandbLoggerConfig:
    """wandb through Lightning; offline (no account needed) unless offline=false."""

    _target_: str = "lightning.pytorch.loggers.WandbLogger"
    project: str = "foxp2-sae"
    entity: Optional[str] = None
    # None: <kind>-<sites>-<n_latents> (set by the app).
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    offline: bool = True
    save_dir: str = "${out_dir}"
    log_model: bool = False


@dataclass
class CSVLoggerConfig:
    _target_: str = "lightning.pytorch.loggers.CSVLogger"
    save_dir: str = "${out_dir}"
    name: str = "csv"
    version: Optional[str] = None


@dataclass
class TrainAppConfig:
    """`sae-train`: train one SAE per cached site with Lightning."""

    # The activation cache to read (written by sae-cache; default: the demo model's cache).
    cache_dir: str = "${paths.root}/cache/gemma3-270m-embedded"
    # "all" (every cached site), one site ("layers.6.resid"), a pattern ("layers.*.resid",
    # "layers.3-6.mlp") or a list of them. All selected sites train together in this run.
    sites: Any = "all"
    # Run directory: checkpoints, logs and (by default) the exported SAEs.
    out_dir: str = "${hydra:runtime.output_dir}"
    # Train on this many tokens (all ranks together), cycling through the cache as needed; it
    # sets trainer.max_steps. null: trainer.max_steps / max_epochs decide (default: one epoch).
    max_tokens: Optional[int] = None
    seed: int = 0
    # torch intra-op threads (CPU work); null: torch's default. Small SAEs on few cores are
    # often faster with 1.
    num_threads: Optional[int] = None
    sae: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Any = None
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: SplicedEvalConfig = field(default_factory=SplicedEvalConfig)
    # Extra Lightning callbacks by name, each a `_target_` spec, e.g.
    # callbacks.lr={_target_: lightning.pytorch.callbacks.LearningRateMonitor}
    callbacks: dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)


def validate_train_config(cfg) -> None:
    """Bounds on every numeric option, before anything runs: each group's dataclass
    ``__post_init__`` (through OmegaConf.to_object) and the top-level numbers."""
    from omegaconf import OmegaConf

    for group in ("loader", "optim", "metrics", "checkpoint", "export", "eval"):
        OmegaConf.to_object(cfg[group])
    if cfg.max_tokens is not None:
        require_int("max_tokens", cfg.max_tokens, low=1)
    if cfg.num_threads is not None:
        require_int("num_threads", cfg.num_threads, low=1)
    kind = cfg.sae.get("kind") if cfg.get("sae") is not None else None
    if cfg.export.format == "sparsify" and kind != "topk":
        raise ValueError(f"export.format=sparsify cannot hold a {kind!r} SAE (sparsify has TopK "
                         "only): use export.format=native or saelens")
    if not str(cfg.cache_dir).strip():
        raise ValueError("cache_dir is empty: give the activation cache written by sae-cache")


def register_train_configs() -> None:
    """Register the schemas; the YAML files list `<name>_schema` first in their defaults."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainAppConfig)
    cs.store(group="sae", name="topk_schema", node=TopKConfig)
    cs.store(group="sae", name="batchtopk_schema", node=BatchTopKConfig)
    cs.store(group="sae", name="relu_schema", node=ReLUConfig)
    cs.store(group="sae", name="jumprelu_schema", node=JumpReLUConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="logger", name="wandb_schema", node=WandbLoggerConfig)
    cs.store(group="logger", name="csv_schema", node=CSVLoggerConfig)
