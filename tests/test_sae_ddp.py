"""DDP through Lightning with 2 CPU processes (gloo): disjoint data, identical weights, pooled metrics."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from sae_train.cache.reader import ActivationCache
from sae_train.saes import load_sae
from sae_train.training import ExportSAEs, SAETrainingModule
from sae_train.cache.datamodule import ActivationDataModule
from test_sae_support import csv_metrics, fvu, last_value, one_torch_thread, site_rows, tiny_cache  # noqa: F401

SITE = "layers.1.resid"


class RecordRank(L.Callback):
    """Each rank writes the token ids it trained on and its final parameters to <dir>/rank<r>.pkl."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.indices: list[np.ndarray] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices.append(batch["index"].numpy().copy())

    def on_train_end(self, trainer, pl_module):
        params = {k: v.detach().clone() for k, v in pl_module.sae(SITE).state_dict().items()}
        record = {"rank": trainer.global_rank, "world": trainer.world_size,
                  "threads": torch.get_num_threads(), "indices": self.indices, "params": params}
        with open(Path(self.out_dir) / f"rank{trainer.global_rank}.pkl", "wb") as f:
            pickle.dump(record, f)


def test_ddp_two_cpu_ranks(tiny_cache, tmp_path):
    steps, batch = 12, 256
    module = SAETrainingModule({"kind": "topk", "n_latents": 128, "k": 8}, {SITE: 64},
                               optim={"warmup_steps": 2}, metrics={"every_n_steps": 4},
                               stats_tokens=2048)
    datamodule = ActivationDataModule(str(tiny_cache), [SITE], batch, val_splits=["evaluation"],
                               prefetch=0)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=steps, max_epochs=-1,
        logger=CSVLogger(tmp_path, name="csv"), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
        log_every_n_steps=1,
        callbacks=[RecordRank(str(tmp_path)), ExportSAEs(tmp_path / "export")])
    trainer.fit(module, datamodule=datamodule)

    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)

    # Ranks read disjoint tokens, each a full batch per step, all from the training split.
    seen = [np.concatenate(r["indices"]) for r in ranks]
    assert all(len(s) == steps * batch for s in seen)
    assert len(np.intersect1d(seen[0], seen[1])) == 0
    cache = ActivationCache(tiny_cache)
    val = cache.select(["evaluation"])
    assert len(np.intersect1d(np.concatenate(seen), val)) == 0

    # DDP kept the two replicas bit-identical, and they trained (moved from the init).
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), f"{name} differs across ranks"
    assert not torch.allclose(ranks[0]["params"]["b_enc"], torch.zeros_like(
        ranks[0]["params"]["b_enc"]))

    # The logged validation FVU pools both ranks' halves of the held-out tokens: it equals one
    # process computing FVU over all of them with the exported SAE.
    logged = last_value(csv_metrics(tmp_path), f"val/{SITE}/fvu")
    sae = load_sae(tmp_path / "export" / SITE)
    x = site_rows(tiny_cache, SITE, ["evaluation"])
    with torch.no_grad():
        expected = fvu(x, sae(x).reconstruction)
    assert logged == pytest.approx(expected, rel=1e-4)
    assert 0.05 < expected < 0.95


def test_ddp_sweep_through_the_app(tiny_cache, tmp_path):
    """`sae-train -m trainer=ddp trainer.accelerator=cpu trainer.devices=2 sites=a,b`: Lightning
    re-launches each job's second rank (not the whole sweep), and jobs run one after another."""
    import json
    import os
    import subprocess
    import sys

    from test_sae_support import FAST

    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, "-m", "sae_train.apps.train_app", "-m", f"hydra.sweep.dir={sweep}",
           f"cache_dir={tiny_cache}", "sites=layers.1.resid,layers.2.mlp", "trainer=ddp",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "logger=csv", "max_tokens=10240", *FAST]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for job, site in enumerate(["layers.1.resid", "layers.2.mlp"]):
        cfg = json.loads((sweep / str(job) / site / "cfg.json").read_text())
        # 10240 tokens = 10 steps of 512 tokens on each of 2 ranks
        assert cfg["metadata"]["training"]["global_step"] == 10
        assert cfg["metadata"]["training"]["tokens_seen"] == 10240
    # One sweep: a rank re-launched with the original `-m` command line would start another.
    assert (result.stdout + result.stderr).count("Launching 2 jobs") == 1
