"""JumpReLU SAE (Rajamanoharan et al. 2024): z_j = a_j · H(a_j − θ_j), trained with an L0 penalty.

The step function has no useful gradient, so θ gets a straight-through pseudo-derivative: a
rectangle kernel of width ``bandwidth`` around the threshold. Two known ways for θ to never move
are guarded against here:

- a log-threshold under Adam: each step moves log θ by about lr, i.e. θ by about θ·lr, which is
  nothing for a small θ. θ is parametrised directly (Adam then moves it by about lr per step)
  and clamped positive after each step;
- a kernel narrower than the spread of pre-activations near θ: almost no token lands inside it
  and θ gets no gradient. Inputs are normalised (E‖x‖ = √d, pre-activations are O(1)), the
  default bandwidth is sized for that, and θ starts at a per-latent quantile of the data's
  pre-activations (``init_density``), so each latent starts where its tokens are.
θ is created in float32 (bf16 would round small Adam steps away; bf16-mixed keeps it so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_train.saes.base import (SAEConfig, SAEConfigError, SAEOutput, SparseAutoencoder,
                                 fraction_of_variance_unexplained)

_MIN_THRESHOLD = 1e-4


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """a · H(a − θ); ∂/∂a = H(a − θ), ∂/∂θ = −(θ/ε) · rect((a − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre_acts: Tensor, threshold: Tensor, bandwidth: float):
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return pre_acts * (pre_acts > threshold)

    @staticmethod
    def backward(ctx, grad_out):
        pre_acts, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_out * (pre_acts > threshold)
        kernel = _rectangle((pre_acts - threshold) / eps)
        grad_threshold = (-(threshold / eps) * kernel * grad_out).sum(0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    """H(a − θ); ∂/∂θ = −(1/ε) · rect((a − θ)/ε); no gradient to a."""

    @staticmethod
    def forward(ctx, pre_acts: Tensor, threshold: Tensor, bandwidth: float):
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        pre_acts, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = (-(1.0 / eps) * _rectangle((pre_acts - threshold) / eps)
                          * grad_out).sum(0)
        return None, grad_threshold, None


@dataclass
class JumpReLUConfig(SAEConfig):
    kind: str = "jumprelu"
    # Weight of the mean number of active latents per token.
    l0_coefficient: float = 1e-3
    # Width of the pseudo-derivative window, in scaled-input units (pre-activations are O(1)).
    bandwidth: float = 0.05
    # Initial firing probability of each latent: θ_j starts at the (1 − init_density) quantile
    # of latent j's pre-activations on the data sample.
    init_density: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l0_coefficient < 0:
            raise SAEConfigError("sae.l0_coefficient must be ≥ 0")
        if self.bandwidth <= 0:
            raise SAEConfigError("sae.bandwidth must be positive")
        if not 0 < self.init_density < 1:
            raise SAEConfigError("sae.init_density must be in (0, 1)")


class JumpReLUSAE(SparseAutoencoder):
    config_class = JumpReLUConfig
    config: JumpReLUConfig

    def __init__(self, config: JumpReLUConfig, d_in: int):
        super().__init__(config, d_in)
        self.threshold = nn.Parameter(torch.full((self.n_latents,), 0.1, dtype=torch.float32))

    def encode(self, x: Tensor) -> Tensor:
        pre_acts = self.pre_activations(x)
        return pre_acts * (pre_acts > self.threshold)

    def forward(self, x: Tensor, *, dead_mask: Optional[Tensor] = None,
                sparsity_scale: float = 1.0) -> SAEOutput:
        x_scaled = self.scale_input(x)
        pre_acts = F.linear(x_scaled - self.b_dec, self.encoder_weight, self.b_enc).float()
        eps = self.config.bandwidth
        codes = _JumpReLU.apply(pre_acts, self.threshold, eps)
        recon_scaled = codes @ self.W_dec + self.b_dec
        l0 = _Step.apply(pre_acts, self.threshold, eps).sum(-1).mean()
        losses = {"fvu": fraction_of_variance_unexplained(x_scaled, recon_scaled),
                  "l0": sparsity_scale * self.config.l0_coefficient * l0}
        return SAEOutput(recon_scaled / self.input_scale, codes, None, losses)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=_MIN_THRESHOLD)

    @torch.no_grad()
    def initialize_from_data(self, sample: Tensor) -> None:
        super().initialize_from_data(sample)
        rows = sample[:4096]
        pre_acts = self.pre_activations(rows).float()  # (n, n_latents)
        rank = max(1, int(round((1 - self.config.init_density) * pre_acts.shape[0])))
        quantile = pre_acts.kthvalue(rank, dim=0).values
        self.threshold.copy_(quantile.clamp_min(_MIN_THRESHOLD))

    def folded_state(self) -> dict[str, Tensor]:
        state = super().folded_state()
        state["threshold"] = (self.threshold / self.input_scale).detach().clone()
        return state

    @torch.no_grad()
    def load_folded_state(self, state: dict[str, Tensor]) -> None:
        super().load_folded_state(state)
        self.threshold.copy_(state["threshold"])
