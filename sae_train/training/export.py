"""Write the trained SAEs at the end of fit: ``<dir>/<site>/{cfg.json, sae.safetensors}``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from sae_train.saes import save_sae
from sae_train.saes.io import EXPORT_FORMATS

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportSAEs(L.Callback):
    """On fit end (not on a crash), rank 0 saves every site's SAE with its input scale folded.

    ``metadata`` (cache provenance, run config) is stored in each cfg.json next to the module's
    training summary. ``wandb_artifact`` also logs each folder as a wandb model artifact.
    """

    def __init__(self, out_dir: str | Path, metadata: Optional[dict] = None,
                 dtype: str = "float32", wandb_artifact: bool = False, format: str = "native"):
        if dtype not in _DTYPES:
            raise ValueError(f"export.dtype={dtype!r}: use one of {sorted(_DTYPES)}")
        if format not in EXPORT_FORMATS:
            raise ValueError(f"export.format={format!r}: use one of {', '.join(EXPORT_FORMATS)}")
        self.out_dir = Path(out_dir)
        self.metadata = metadata or {}
        self.dtype = _DTYPES[dtype]
        self.wandb_artifact = wandb_artifact
        self.format = format
        self.exported: dict[str, Path] = {}
        # Last held-out metrics per site; kept in checkpoints so that resuming a finished run
        # (no new validation) exports them again instead of an empty dict.
        self.val_metrics: dict[str, dict[str, float]] = {}

    def state_dict(self) -> dict:
        return {"val_metrics": self.val_metrics}

    def load_state_dict(self, state: dict) -> None:
        self.val_metrics = dict(state.get("val_metrics", {}))

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        for site in pl_module.sites:
            metrics = {k.split("/")[-1]: float(v) for k, v in trainer.callback_metrics.items()
                       if k.startswith(f"val/{site}/") and getattr(v, "numel", lambda: 1)() == 1}
            if metrics:
                self.val_metrics[site] = metrics

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.interrupted or not trainer.is_global_zero:
            return
        if trainer.global_step == 0:
            log.error("no optimizer step was run: nothing is exported")
            return  # the app reports it as an error
        summary = pl_module.export_metadata()
        for site in pl_module.sites:
            metadata = {**self.metadata, "site": site, "training": summary,
                        "val_metrics": self.val_metrics.get(site, {})}
            path = save_sae(pl_module.sae(site), self.out_dir / site, metadata, dtype=self.dtype,
                            format=self.format)
            self.exported[site] = path
            log.info("exported %s → %s", site, path)
            if self.wandb_artifact:
                self._log_artifact(trainer, site, path)

    @staticmethod
    def _log_artifact(trainer: L.Trainer, site: str, path: Path) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                run = logger.experiment
                artifact = wandb.Artifact(f"sae-{run.id}-{site}", type="model",
                                          metadata={"site": site})
                artifact.add_dir(str(path))
                run.log_artifact(artifact)
