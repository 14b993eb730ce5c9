"""SAE metrics as torchmetrics objects.

Every state is a sum (``dist_reduce_fx="sum"``), so a value computed under DDP pools all ranks'
tokens exactly as one process would: FVU is Σ‖x − x̂‖² / Σ‖x − x̄‖² over *all* tokens, not a mean
of per-rank ratios. States accumulate in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


def _zeros(*shape: int) -> Tensor:
    return torch.zeros(shape, dtype=torch.float64)


class FractionOfVarianceUnexplained(Metric):
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² over every token seen (x̄: mean of those tokens)."""

    full_state_update = False

    def __init__(self, d_in: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("squared_error", _zeros(), dist_reduce_fx="sum")
        self.add_state("sum_x", _zeros(d_in), dist_reduce_fx="sum")
        self.add_state("sum_squared_norm", _zeros(), dist_reduce_fx="sum")
        self.add_state("n_tokens", _zeros(), dist_reduce_fx="sum")

    def update(self, x: Tensor, reconstruction: Tensor) -> None:
        x = x.detach().to(torch.float64)
        self.squared_error += (x - reconstruction.detach().to(torch.float64)).pow(2).sum()
        self.sum_x += x.sum(0)
        self.sum_squared_norm += x.pow(2).sum()
        self.n_tokens += x.shape[0]

    def compute(self) -> Tensor:
        total_variance = self.sum_squared_norm - self.sum_x.pow(2).sum() / self.n_tokens
        return (self.squared_error / total_variance.clamp_min(1e-12)).to(torch.float32)


class ExplainedVariance(Metric):
    """1 − Σ_d Var(x_d − x̂_d) / Σ_d Var(x_d): like 1 − FVU, but a constant offset in the error
    (a biased reconstruction) is not counted against the SAE."""

    full_state_update = False

    def __init__(self, d_in: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("sum_error", _zeros(d_in), dist_reduce_fx="sum")
        self.add_state("sum_squared_error", _zeros(), dist_reduce_fx="sum")
        self.add_state("sum_x", _zeros(d_in), dist_reduce_fx="sum")
        self.add_state("sum_squared_norm", _zeros(), dist_reduce_fx="sum")
        self.add_state("n_tokens", _zeros(), dist_reduce_fx="sum")

    def update(self, x: Tensor, reconstruction: Tensor) -> None:
        x = x.detach().to(torch.float64)
        error = x - reconstruction.detach().to(torch.float64)
        self.sum_error += error.sum(0)
        self.sum_squared_error += error.pow(2).sum()
        self.sum_x += x.sum(0)
        self.sum_squared_norm += x.pow(2).sum()
        self.n_tokens += x.shape[0]

    def compute(self) -> Tensor:
        n = self.n_tokens
        error_variance = self.sum_squared_error - self.sum_error.pow(2).sum() / n
        total_variance = self.sum_squared_norm - self.sum_x.pow(2).sum() / n
        return (1 - error_variance / total_variance.clamp_min(1e-12)).to(torch.float32)


class MeanL0(Metric):
    """Mean number of active latents per token."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("active", _zeros(), dist_reduce_fx="sum")
        self.add_state("n_tokens", _zeros(), dist_reduce_fx="sum")

    def update(self, l0: Tensor) -> None:
        """``l0``: (batch,) active latents of each token (``SAEOutput.l0()``)."""
        self.active += l0.sum()
        self.n_tokens += l0.shape[0]

    def compute(self) -> Tensor:
        return (self.active / self.n_tokens.clamp_min(1)).to(torch.float32)


class FeatureDensity(Metric):
    """Per-latent firing frequency over the tokens seen since the last reset (a window).

    ``compute()`` returns the (n_latents,) densities; :func:`dead_fraction` and
    :func:`density_histogram` summarise them.
    """

    full_state_update = False

    def __init__(self, n_latents: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("fire_counts", _zeros(n_latents), dist_reduce_fx="sum")
        self.add_state("n_tokens", _zeros(), dist_reduce_fx="sum")

    def update(self, fire_counts: Tensor, n_tokens: int) -> None:
        """``fire_counts``: (n_latents,) tokens each latent fired for, among ``n_tokens``."""
        self.fire_counts += fire_counts.to(torch.float64)
        self.n_tokens += n_tokens

    def compute(self) -> Tensor:
        return self.fire_counts / self.n_tokens.clamp_min(1)


def dead_fraction(density: Tensor) -> float:
    """Fraction of latents that never fired in the window."""
    return float((density == 0).to(torch.float64).mean())


DEAD_LOG_DENSITY = -10.0


def density_histogram(density: Tensor, bins: int = 50) -> tuple[Tensor, Tensor]:
    """(counts, edges) of log10 densities on [−10, 0]; dead latents land in the first bin."""
    log_density = torch.where(density > 0, density.clamp_min(1e-10).log10(),
                              torch.full_like(density, DEAD_LOG_DENSITY)).to(torch.float32)
    counts = torch.histc(log_density, bins=bins, min=DEAD_LOG_DENSITY, max=0.0)
    edges = torch.linspace(DEAD_LOG_DENSITY, 0.0, bins + 1)
    return counts, edges


def density_summary(density: Tensor) -> dict[str, float]:
    """Scalars for loggers without histograms: dead fraction, rare (< 1e-5) and dense (> 0.1)
    fractions, median log10 density of live latents."""
    live = density[density > 0]
    median = float(live.log10().median()) if live.numel() else -math.inf
    return {"dead_fraction": dead_fraction(density),
            "rare_fraction": float(((density > 0) & (density < 1e-5)).to(torch.float64).mean()),
            "dense_fraction": float((density > 0.1).to(torch.float64).mean()),
            "median_log10_density": median}
