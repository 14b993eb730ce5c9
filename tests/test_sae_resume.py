"""A crashed run resumed from its last checkpoint ends with the same weights and loss curve as an
uninterrupted run; a NaN loss stops the run with a clear error and keeps the last good checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from sae_train.saes import load_sae
from sae_train.training import NonFiniteLossError, SAETrainingModule
from test_sae_support import FAST, csv_metrics, one_torch_thread, run_app, tiny_cache  # noqa: F401

SITE = "layers.1.resid"


class CrashAfterStep(L.Callback):
    """Simulates a killed job: raises once `step` optimizer steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash after step {trainer.global_step}")


class PoisonWeightsAtStep(L.Callback):
    """Writes a NaN into the decoder after `step` steps, so the next loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.sae(SITE).W_dec[0, 0] = float("nan")


def _args(cache: Path, out: Path, run_dir: Path, *extra: str) -> list[str]:
    # max_tokens spans about 1.5 epochs of the training split: the resume crosses an epoch edge.
    return [*FAST, f"cache_dir={cache}", f"sites={SITE}", f"out_dir={out}",
            f"hydra.run.dir={run_dir}", "logger=csv", "sae.k=16", "max_tokens=14336",
            "checkpoint.every_n_steps=10", "trainer.log_every_n_steps=1", *extra]


def _losses(out: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in csv_metrics(out) if r.get("train/loss")}


def test_resume_after_crash_matches_uninterrupted_run(tiny_cache, tmp_path, monkeypatch):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_app(monkeypatch, _args(tiny_cache, straight, tmp_path / "h1"))

    crash = [f"+callbacks.crash._target_={__name__}.CrashAfterStep", "+callbacks.crash.step=23"]
    with pytest.raises(RuntimeError, match="simulated crash after step 23"):
        run_app(monkeypatch, _args(tiny_cache, crashed, tmp_path / "h2", *crash))
    assert (crashed / "checkpoints" / "last.ckpt").exists()
    assert not (crashed / SITE).exists()  # no export from a crashed run
    assert torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)[
        "global_step"] == 20

    run_app(monkeypatch, _args(tiny_cache, crashed, tmp_path / "h3", "checkpoint.resume=auto"))

    a, b = load_sae(straight / SITE), load_sae(crashed / SITE)
    assert a.metadata["training"]["global_step"] == b.metadata["training"]["global_step"] == 28
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), f"{name} differs after resume"
    # Same loss curve after the resume point (steps 21–28) as without the interruption.
    before, after = _losses(straight), _losses(crashed)
    resumed = [s for s in after if s >= 20 and s in before]
    assert len(resumed) >= 3
    assert [after[s] for s in resumed] == [before[s] for s in resumed]


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tiny_cache, tmp_path,
                                                                        monkeypatch):
    out = tmp_path / "out"
    poison = [f"+callbacks.poison._target_={__name__}.PoisonWeightsAtStep",
              "+callbacks.poison.step=13"]
    with pytest.raises(NonFiniteLossError) as err:
        run_app(monkeypatch, _args(tiny_cache, out, tmp_path / "h", *poison))
    message = str(err.value)
    assert "non-finite loss at step 13" in message
    assert "last good checkpoint is" in message and "last.ckpt" in message
    last = out / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values()
               if v.is_floating_point())
    assert not (out / SITE).exists()
    # The kept checkpoint restores into a module (usable for a resume).
    module = SAETrainingModule.load_from_checkpoint(last)
    assert torch.isfinite(module.sae(SITE).W_dec).all()
