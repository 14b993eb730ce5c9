"""Dictionary recovery: a TopK SAE trained through the LightningModule finds the atoms that
generated sparse synthetic data."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from sae_train.training import SAETrainingModule
from test_sae_support import one_torch_thread  # noqa: F401

D, N_ATOMS, ACTIVE, N_TOKENS, BATCH = 32, 128, 4, 200_000, 1024


def synthetic_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(atoms (N_ATOMS, D) unit rows, x (N_TOKENS, D)): each token is ACTIVE random atoms with
    coefficients in [0.5, 2.5], plus a constant offset (so b_dec matters) and small noise."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(N_ATOMS, D, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    chosen = torch.rand(N_TOKENS, N_ATOMS, generator=g).topk(ACTIVE, dim=1).indices  # distinct
    coefficients = torch.rand(N_TOKENS, ACTIVE, generator=g) * 2 + 0.5
    x = torch.einsum("ta,tad->td", coefficients, atoms[chosen])
    return atoms, x + 3.0 + 0.01 * torch.randn(N_TOKENS, D, generator=g)


class Batches(Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x) // BATCH

    def __getitem__(self, i: int) -> dict:
        return {"synthetic": self.x[i * BATCH:(i + 1) * BATCH]}


def recovered_fraction(atoms: torch.Tensor, decoder: torch.Tensor) -> float:
    """Fraction of true atoms whose best-matching decoder row has cosine > 0.9."""
    rows = decoder / decoder.norm(dim=1, keepdim=True)
    return float(((atoms @ rows.T).max(dim=1).values > 0.9).float().mean())


def test_topk_recovers_the_generating_dictionary():
    torch.manual_seed(0)
    atoms, x = synthetic_data(seed=1234)  # not the init stream (seed 0)
    module = SAETrainingModule({"kind": "topk", "n_latents": 256, "k": ACTIVE}, {"synthetic": D},
                               optim={"lr": 3e-3, "warmup_steps": 20},
                               metrics={"every_n_steps": 50, "dead_after_tokens": 50_000})
    sae = module.sae("synthetic")
    sae.initialize_from_data(x[:8192])
    module.data_initialized.fill_(True)
    # The measurement discriminates: a random dictionary matches (almost) no atom.
    assert recovered_fraction(atoms, sae.W_dec.detach()) < 0.05

    trainer = L.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(Batches(x), batch_size=None, shuffle=True))

    assert recovered_fraction(atoms, sae.W_dec.detach()) >= 0.9
    assert float(trainer.callback_metrics["train/synthetic/fvu"]) < 0.25
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))  # unit-norm decoder kept
