"""`sae-train`: train SAEs on an activation cache with Lightning (Hydra app).

    sae-train cache_dir=/data/cache sites=layers.6.resid                 # one SAE
    sae-train cache_dir=/data/cache sites=all sae=jumprelu               # every cached site
    sae-train -m cache_dir=/data/cache sites=layers.0.resid,layers.6.resid sae.k=16,32
    sae-train -m hydra/launcher=slurm hydra.launcher.partition=gpu trainer=gpu \\
        cache_dir=/shared/cache sites=layers.0.resid,layers.6.resid
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

# CPU training allocates several (n_latents, d) buffers per step (gradients, bf16 weight
# copies); on transparent huge pages their first-touch page faults cost ~5x less (read by torch
# at its first large allocation). Set THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from sae_train.apps import config_dir, report_user_errors
from sae_train.cache.manifest import CacheError
from sae_train.cache.reader import ActivationCache
from sae_train.models.loading import resolve_precision
from sae_train.models.sites import expand_site_patterns
from sae_train.training.config import register_train_configs, validate_train_config
from sae_train.training.fingerprint import check_resume
from sae_train.cache.datamodule import ActivationDataModule
from sae_train.training.export import ExportSAEs
from sae_train.training.module import SAETrainingModule
from sae_train.training.spliced_eval import SplicedEvalCallback

log = logging.getLogger("sae-train")
register_train_configs()


def training_sites(cache: ActivationCache, sites: Any) -> list[str]:
    """The cached sites selected by ``sites``: "all", a name, a pattern, or a list of them.

    Patterns with ``*`` select the cached sites they match; every other name or range must be
    in the cache, or the error lists what the cache holds.
    """
    if OmegaConf.is_config(sites):
        sites = OmegaConf.to_container(sites)
    patterns = [sites] if isinstance(sites, str) else [str(s) for s in sites or []]
    cached = cache.site_names
    if not patterns:
        raise CacheError(f"no sites given; the cache at {cache.path} has {', '.join(cached)}")
    if patterns == ["all"]:
        return cached
    chosen: list[str] = []
    for pattern in patterns:
        if "*" in pattern:
            matched = [s for s in cached if fnmatch.fnmatchcase(s, pattern)]
            if not matched:
                raise CacheError(f"site pattern {pattern!r} matches none of the cached sites "
                                 f"({', '.join(cached)}) in {cache.path}")
        else:
            # (names, ranges and lists need no layer count; a malformed one raises SiteError)
            matched = expand_site_patterns(pattern, n_layers=0)
            missing = [s for s in matched if s not in cached]
            if missing:
                raise CacheError(f"site(s) {', '.join(missing)} not in the cache at {cache.path}; "
                                 f"it has {', '.join(cached)} (cache them with sae-cache, or "
                                 "pick cached sites)")
        chosen += [s for s in matched if s not in chosen]
    return chosen


def run_name(cfg: DictConfig, sites: list[str]) -> str:
    sae = cfg.sae
    size = sae.n_latents if sae.n_latents is not None else f"x{sae.expansion_factor}"
    k = f"-k{sae.k}" if "k" in sae else ""
    where = sites[0] if len(sites) == 1 else f"{len(sites)}sites"
    return f"{sae.kind}-{where}-{size}{k}"


def build_training(cfg: DictConfig):
    """(trainer, module, datamodule, export callback) for ``cfg``; nothing runs yet.

    Works without a Hydra run too (``sae_train.train_saes``): ``out_dir``'s default, the Hydra
    run folder, then becomes ``<paths.root>/train/<date>_<time>``.
    """
    from sae_train.api import default_out_dir

    default_out_dir(cfg)
    validate_train_config(cfg)
    try:
        cache = ActivationCache(cfg.cache_dir)
    except CacheError as err:
        raise CacheError(f"{err} (cache_dir={cfg.cache_dir})") from err
    sites = training_sites(cache, cfg.sites)
    widths = {site: cache.width(site) for site in sites}
    sae_config = OmegaConf.to_object(cfg.sae)  # runs the dataclass validation
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    L.seed_everything(cfg.seed, workers=True)
    module = SAETrainingModule(
        sae=sae_config, widths=widths, optim=OmegaConf.to_container(cfg.optim, resolve=True),
        metrics=OmegaConf.to_container(cfg.metrics, resolve=True),
        stats_tokens=cfg.loader.stats_tokens, seed=cfg.seed)
    module.cache_config_hash = cache.manifest.get("config_hash")
    loader = cfg.loader
    datamodule = ActivationDataModule(
        cfg.cache_dir, sites, loader.batch_size,
        train_splits=_list(loader.train_splits), val_splits=_list(loader.val_splits) or None,
        languages=_list(loader.languages), seed=cfg.seed, shuffle=loader.shuffle,
        drop_last=True, block_tokens=loader.block_tokens, window_tokens=loader.window_tokens,
        prefetch=loader.prefetch, verify=loader.verify)
    provenance = cache.manifest.get("config", {}).get("provenance", {})
    export = ExportSAEs(cfg.export.dir, dtype=cfg.export.dtype,
                        wandb_artifact=cfg.export.wandb_artifact, format=cfg.export.format,
                        metadata={"cache_dir": str(Path(cfg.cache_dir).resolve()),
                                  "cache_config_hash": cache.manifest.get("config_hash"),
                                  "model": provenance.get("model", {}),
                                  "tokenizer": provenance.get("tokenizer")})
    callbacks = [
        ModelCheckpoint(dirpath=cfg.checkpoint.dir, filename="step{step:08d}",
                        auto_insert_metric_name=False, every_n_train_steps=cfg.checkpoint.every_n_steps,
                        save_last=True, save_top_k=1),
        export,
    ]
    callbacks += [instantiate(spec) for spec in cfg.callbacks.values() if spec is not None]
    if cfg.eval.enabled:
        e = cfg.eval
        callbacks.append(SplicedEvalCallback(
            cache, e.every_n_steps, list(e.splits), e.max_documents, e.batch_size, e.max_length,
            e.model_name, e.model_dtype, e.device))
    logger = False
    if cfg.logger:
        extra = {"name": run_name(cfg, sites)} if "name" in cfg.logger and \
            cfg.logger.name is None else {}
        logger = instantiate(cfg.logger, **extra)
    precision = resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks,
                                     precision=precision)
    if cfg.max_tokens is not None:
        tokens_per_step = cfg.loader.batch_size * trainer.world_size * \
            cfg.trainer.accumulate_grad_batches
        trainer.fit_loop.epoch_loop.max_steps = math.ceil(cfg.max_tokens / tokens_per_step)
        trainer.fit_loop.max_epochs = -1
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer, module, datamodule, export


def _list(value) -> list | None:
    return None if value is None else [str(v) for v in value]


def _resume_path(cfg: DictConfig, module: SAETrainingModule) -> str | None:
    """The checkpoint to resume from (None: start fresh), checked against this run's config."""
    resume = cfg.checkpoint.resume
    if not resume:
        return None
    if resume == "auto":
        last = Path(cfg.checkpoint.dir) / "last.ckpt"
        if not last.exists():
            return None
        resume = str(last)
    elif not Path(resume).is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume!r} does not exist (use a .ckpt path, "
                                "'auto' for <checkpoint.dir>/last.ckpt, or null)")
    check_resume(resume, module.weight_fingerprint())
    return resume


def _fix_ddp_argv_in_multirun(cfg: DictConfig) -> None:
    """Lightning's ``ddp`` re-launches ``sys.argv`` for ranks > 0; inside a ``-m`` sweep that would
    start a new sweep. Relaunch this job alone instead (its overrides, its output directory)."""
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return
    if hydra_cfg.mode != RunMode.MULTIRUN or "SLURM_NTASKS" in os.environ:
        return
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra/launcher")]
    sys.argv = [sys.argv[0], *overrides, f"out_dir={cfg.out_dir}"]


def run_training(cfg: DictConfig) -> dict:
    """Train, export and return ``{"exported": {site: path}, "metrics": {...}}``."""
    trainer, module, datamodule, export = build_training(cfg)
    if trainer.world_size > 1 and trainer.num_devices > 1:
        _fix_ddp_argv_in_multirun(cfg)
    log.info("training %s on %s (%d tokens/step/rank) → %s", module.sae_config.kind,
             ", ".join(module.sites), cfg.loader.batch_size, cfg.out_dir)
    environment = dict(os.environ)
    ckpt_path = _resume_path(cfg, module)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        _restore_environment(environment)
    if trainer.global_step == 0 and not trainer.interrupted:
        _finish_wandb(trainer)
        raise NoTrainingError(_no_training_message(cfg, datamodule, trainer))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if getattr(v, "numel", lambda: 1)() == 1 and math.isfinite(float(v))}
    if trainer.is_global_zero:
        for site, path in export.exported.items():
            fvu = metrics.get(f"val/{site}/fvu")
            log.info("%s: val FVU %s → %s", site, f"{fvu:.4f}" if fvu is not None else "n/a", path)
    _finish_wandb(trainer)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # The next job of an in-process sweep starts its own process group.
        torch.distributed.destroy_process_group()
    return {"exported": {k: str(v) for k, v in export.exported.items()}, "metrics": metrics}


class NoTrainingError(RuntimeError):
    """fit ended without a single optimizer step: there is nothing worth exporting."""


def _no_training_message(cfg: DictConfig, datamodule, trainer) -> str:
    data = datamodule.train_data
    tokens = len(data.indices) if data is not None else 0
    return (f"no training step was run, so no SAE was exported: the training split of "
            f"{cfg.cache_dir} has {tokens} tokens and loader.batch_size={cfg.loader.batch_size} "
            f"× {trainer.world_size} rank(s) needs at least one full batch (lower "
            "loader.batch_size, or check loader.train_splits / loader.languages / trainer.*)")


def _restore_environment(before: dict[str, str]) -> None:
    """Undo what DDP launching put into os.environ (LOCAL_RANK, MASTER_PORT, ...): left behind,
    it makes the next job of an in-process sweep wait for ranks that were never started."""
    for key in set(os.environ) - set(before):
        del os.environ[key]
    os.environ.update(before)


def _finish_wandb(trainer: L.Trainer) -> None:
    """End the wandb run so the next job of an in-process sweep starts a new one."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in trainer.loggers) and trainer.is_global_zero:
        import wandb

        wandb.finish()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_training(cfg)


if __name__ == "__main__":
    main()
