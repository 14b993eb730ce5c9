"""The LightningModule shared by every architecture: one SAE per site, trained together.

Lightning owns devices, precision (``precision=bf16-mixed`` autocasts the SAE), DDP, checkpoints
and logging. This module owns what is specific to SAEs: data-dependent initialisation, the
unit-norm decoder constraint (in ``on_after_backward`` / after each optimizer step), the dead-latent
mask for AuxK, the metrics, and stopping on a non-finite loss.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor, nn

from sae_train.saes import SAEOutput, SparseAutoencoder, build_sae, sae_config
from sae_train.training.activation_stats import sample_activations
from sae_train.training.config import MetricsConfig, OptimConfig
from sae_train.training.dead_latents import DeadLatentTracker
from sae_train.training.metrics import (ExplainedVariance, FeatureDensity,
                                        FractionOfVarianceUnexplained, MeanL0, density_histogram,
                                        density_summary)

log = logging.getLogger(__name__)

# Checkpoint entry holding SAETrainingModule.weight_fingerprint().
FINGERPRINT_KEY = "foxp2_weight_fingerprint"

# Tokens used to calibrate inference thresholds (bounded: it materialises tokens × n_latents).
_CALIBRATION_TOKENS = 2048


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the run stops and keeps its last good checkpoint."""


def default_learning_rate(n_latents: int) -> float:
    """2e-4 / √(n_latents / 2¹⁴) (Gao et al. 2024's scaling)."""
    return 2e-4 / math.sqrt(n_latents / 2 ** 14)


def make_optimizer(params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                   fused: Optional[bool] = None) -> torch.optim.Adam:
    """Adam; ``fused=None`` uses the fused kernel where torch has one for these parameters
    (CPU and CUDA float tensors: several times faster than the default on large SAEs)."""
    params = list(params)
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def site_key(site: str) -> str:
    """Module-dict key of a site (``.`` is not allowed in module names)."""
    return site.replace(".", "_")


class _SiteMetrics(nn.Module):
    def __init__(self, d_in: int, n_latents: int):
        super().__init__()
        self.fvu = FractionOfVarianceUnexplained(d_in)
        self.explained_variance = ExplainedVariance(d_in)
        self.l0 = MeanL0()
        self.density = FeatureDensity(n_latents)

    def update(self, x: Tensor, out: SAEOutput, fire_counts: Tensor) -> None:
        self.fvu.update(x, out.reconstruction)
        self.explained_variance.update(x, out.reconstruction)
        self.l0.update(out.l0())
        self.density.update(fire_counts, x.shape[0])


class SAETrainingModule(L.LightningModule):
    """Trains ``build_sae(sae, widths[site])`` for every site on aligned batches.

    Args:
        sae: SAE config (mapping or dataclass; ``kind`` picks the architecture).
        widths: site name → activation width, in training order.
        optim, metrics: :class:`OptimConfig` / :class:`MetricsConfig` fields as mappings.
        stats_tokens: tokens sampled to initialise input scale / b_dec before training.
        seed: seed of that sample.

    Batches are dicts ``{site: (batch, width) tensor, ...}`` (ActivationDataModule's format).
    """

    def __init__(self, sae: Any, widths: dict[str, int], optim: Optional[dict] = None,
                 metrics: Optional[dict] = None, stats_tokens: int = 32768, seed: int = 0):
        super().__init__()
        config = sae_config(sae)
        self.save_hyperparameters({"sae": config.to_dict(), "widths": dict(widths),
                                   "optim": dict(optim or {}), "metrics": dict(metrics or {}),
                                   "stats_tokens": stats_tokens, "seed": seed})
        if not widths:
            raise ValueError("no sites to train")
        self.sites = list(widths)
        self.sae_config = config
        self.optim_config = OptimConfig(**(optim or {}))
        self.metrics_config = MetricsConfig(**(metrics or {}))
        self.stats_tokens, self.seed = stats_tokens, seed
        self.saes = nn.ModuleDict({site_key(s): build_sae(config, widths[s]) for s in self.sites})
        self.dead = nn.ModuleDict({
            site_key(s): DeadLatentTracker(self.sae(s).n_latents,
                                           self.metrics_config.dead_after_tokens)
            for s in self.sites})
        self.train_metrics = nn.ModuleDict({
            site_key(s): _SiteMetrics(widths[s], self.sae(s).n_latents) for s in self.sites})
        self.val_metrics = nn.ModuleDict({
            site_key(s): _SiteMetrics(widths[s], self.sae(s).n_latents) for s in self.sites})
        self.register_buffer("data_initialized", torch.tensor(False))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    def sae(self, site: str) -> SparseAutoencoder:
        return self.saes[site_key(site)]

    # ------------------------------------------------------------------ checkpoint identity
    def weight_fingerprint(self) -> dict[str, Any]:
        """The settings that shape the weights, flattened (``sae.k``, ``widths.<site>``, ...).

        Stored in every checkpoint; a resume under other values is refused (see
        :func:`sae_train.training.fingerprint.check_resume`). ``cache_config_hash`` is set by the
        app (which cache the data came from)."""
        flat = {f"sae.{k}": v for k, v in self.sae_config.to_dict().items()}
        flat.update({f"widths.{s}": int(w) for s, w in self.hparams["widths"].items()})
        flat["sites"] = list(self.sites)
        flat["cache_config_hash"] = getattr(self, "cache_config_hash", None)
        return flat

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[FINGERPRINT_KEY] = self.weight_fingerprint()

    # ------------------------------------------------------------------ initialisation
    def setup(self, stage: str) -> None:
        """Estimate input scale / b_dec (/ thresholds) on a fixed data sample before training.

        On resume the checkpoint's values replace these right after (Lightning restores weights
        after ``setup``); under DDP rank 0's values are broadcast when the model is wrapped.
        """
        if stage != "fit" or bool(self.data_initialized):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "train_data", None) is None:
            log.warning("no ActivationDataModule: input scale and b_dec keep their defaults")
            return
        for site in self.sites:
            sample = self._sample(datamodule, site)
            self.sae(site).initialize_from_data(sample)
            log.info("%s: input scale %.4g (mean norm %.4g), b_dec from %d tokens", site,
                     float(self.sae(site).input_scale), float(sample.norm(dim=1).mean()),
                     len(sample))
        self.data_initialized.fill_(True)

    def _sample(self, datamodule, site: str) -> Tensor:
        return sample_activations(datamodule.cache, site, datamodule.train_data.indices,
                                  self.stats_tokens, self.seed)

    def _calibrate_thresholds(self) -> None:
        """BatchTopK: set the inference threshold on the data sample (mean L0 = k), so that
        validation measures exactly what is exported. Every rank uses the same sample."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "train_data", None) is None:
            return
        for site in self.sites:
            sae = self.sae(site)
            if hasattr(sae, "calibrate_threshold"):
                sample = self._sample(datamodule, site)[:_CALIBRATION_TOKENS].to(self.device)
                sae.calibrate_threshold(sample)

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._calibrate_thresholds()

    def on_train_end(self) -> None:
        self._calibrate_thresholds()

    # ------------------------------------------------------------------ optimisation
    def learning_rate(self) -> float:
        if self.optim_config.lr is not None:
            return float(self.optim_config.lr)
        return default_learning_rate(max(self.sae(s).n_latents for s in self.sites))

    def configure_optimizers(self):
        cfg = self.optim_config
        optimizer = make_optimizer(self.saes.parameters(), self.learning_rate(), cfg.betas,
                                   cfg.eps, cfg.fused)
        total = self.trainer.estimated_stepping_batches
        decay_steps = int(cfg.decay_fraction * total) if math.isfinite(total) else 0

        def factor(step: int) -> float:
            warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
            if decay_steps > 0 and step >= total - decay_steps:
                warm *= max(0.0, (total - step) / decay_steps)
            return warm

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def sparsity_scale(self) -> float:
        steps = self.optim_config.sparsity_warmup_steps
        return min(1.0, (self.global_step + 1) / steps) if steps > 0 else 1.0

    def on_after_backward(self) -> None:
        for sae in self.saes.values():
            sae.remove_parallel_decoder_grad()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        for sae in self.saes.values():
            sae.after_optimizer_step()

    # ------------------------------------------------------------------ steps
    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _global_fired(self, fire_counts: Tensor) -> Tensor:
        fired = (fire_counts > 0).to(torch.float32)
        if self._world_size() > 1:
            fired = self.trainer.strategy.reduce(fired, reduce_op="sum")
        return fired > 0

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        total = None
        terms: dict[str, Tensor] = {}
        n_tokens = 0
        for site in self.sites:
            x = batch[site].to(torch.float32)
            n_tokens = x.shape[0]
            sae, tracker = self.sae(site), self.dead[site_key(site)]
            dead = tracker.dead_mask() if sae.uses_dead_mask else None
            out = sae(x, dead_mask=dead, sparsity_scale=self.sparsity_scale())
            fire_counts = out.fire_counts(sae.n_latents)
            tracker.update(self._global_fired(fire_counts), n_tokens * self._world_size())
            self.train_metrics[site_key(site)].update(x, out, fire_counts)
            loss = out.loss
            total = loss if total is None else total + loss
            for name, value in out.losses.items():
                terms[f"train/{site}/{name}"] = value.detach()
            terms[f"train/{site}/l0_batch"] = out.l0().float().mean()
            if dead is not None:
                terms[f"train/{site}/dead_for_auxk"] = dead.float().mean()
        self._check_finite(total, terms, batch, batch_idx)
        self.tokens_seen += n_tokens * self._world_size()
        terms["train/loss"] = total.detach()
        self.log_dict(terms, on_step=True, on_epoch=False)
        self._log_windowed_metrics()
        return total

    def _check_finite(self, total: Tensor, terms: dict, batch: dict, batch_idx: int) -> None:
        finite = bool(torch.isfinite(total))
        if self._world_size() > 1:  # every rank must stop together, or the others hang
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        bad_inputs = [s for s in self.sites if not torch.isfinite(batch[s]).all()]
        bad_terms = {k: float(v) for k, v in terms.items() if not math.isfinite(float(v))}
        checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or \
            getattr(self.trainer.checkpoint_callback, "best_model_path", "") or "none yet"
        cause = (f"the cached inputs of {bad_inputs} contain NaN/inf (re-create the cache)"
                 if bad_inputs else "lower optim.lr, or use trainer.precision=32-true if bf16 "
                 "overflowed")
        raise NonFiniteLossError(
            f"non-finite loss at step {self.global_step} (batch {batch_idx}): "
            f"{bad_terms or 'loss is ' + str(float(total))}. Training stopped without saving; "
            f"the last good checkpoint is {checkpoint}. Likely fix: {cause}.")

    def _compute_and_reset(self, stage: str, metrics) -> dict:
        """``{stage}/{site}/{fvu,explained_variance,l0}`` from the accumulated metrics, which
        start over afterwards (windowed during training, per epoch in validation)."""
        values = {}
        for site in self.sites:
            m = metrics[site_key(site)]
            for name, metric in (("fvu", m.fvu), ("explained_variance", m.explained_variance),
                                 ("l0", m.l0)):
                values[f"{stage}/{site}/{name}"] = metric.compute()
                metric.reset()
        return values

    def _log_windowed_metrics(self) -> None:
        step = self.global_step + 1
        if step % self.metrics_config.every_n_steps == 0:
            self.log_dict(self._compute_and_reset("train", self.train_metrics), on_step=True,
                          on_epoch=False)
        density = self.train_metrics[site_key(self.sites[0])].density
        if float(density.n_tokens) * self._world_size() >= self.metrics_config.dead_after_tokens:
            self._log_density("train")

    def _log_density(self, stage: str) -> None:
        metrics = self.train_metrics if stage == "train" else self.val_metrics
        for site in self.sites:
            density = metrics[site_key(site)].density.compute()
            metrics[site_key(site)].density.reset()
            summary = density_summary(density.cpu())
            self.log_dict({f"{stage}/{site}/{k}": v for k, v in summary.items()
                           if math.isfinite(v)}, on_step=stage == "train",
                          on_epoch=stage != "train")
            self._log_histogram(f"{stage}/{site}/log10_feature_density", density.cpu())

    def _log_histogram(self, key: str, density: Tensor) -> None:
        if not self.trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                counts, edges = density_histogram(density, self.metrics_config.histogram_bins)
                hist = wandb.Histogram(np_histogram=(counts.numpy(), edges.numpy()))
                logger.experiment.log({key: hist, "trainer/global_step": self.global_step})

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Lightning skips validation when max_steps ends a run mid-epoch; asking it to stop at
        # that step instead makes it validate the final weights (whose metrics are exported).
        max_steps = self.trainer.max_steps
        if max_steps > 0 and self.global_step >= max_steps:
            self.trainer.should_stop = True

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        for site in self.sites:
            x = batch[site].to(torch.float32)
            sae = self.sae(site)
            out = sae(x)
            self.val_metrics[site_key(site)].update(x, out, out.fire_counts(sae.n_latents))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for m in self.val_metrics.values():
                for metric in m.children():
                    metric.reset()
            return
        values = self._compute_and_reset("val", self.val_metrics)
        self.log_dict(values, on_step=False, on_epoch=True)
        self._log_density("val")
        for site in self.sites:
            if float(values[f"val/{site}/l0"]) < 1e-3 and self.trainer.is_global_zero:
                log.warning("%s: no latent fires on held-out tokens (L0 = 0); the sparsity "
                            "penalty is too strong for this layer (lower sae.l1_coefficient / "
                            "sae.l0_coefficient)", site)

    # ------------------------------------------------------------------ export
    def export_metadata(self) -> dict:
        """Training summary stored in each exported cfg.json."""
        return {"global_step": int(self.global_step), "tokens_seen": int(self.tokens_seen),
                "learning_rate": self.learning_rate(), "optim": asdict(self.optim_config)}
