"""BatchTopK SAE (Bussmann et al. 2024): keep the k·batch largest activations of the whole batch.

Tokens get a variable number of latents during training. At inference a batch-independent rule is
needed: a latent fires when its pre-activation exceeds a threshold. During training the threshold
is a running average of the smallest activation kept per batch (used by validation); at the end
of training :meth:`calibrate_threshold` sets it on a data sample so that the mean L0 is exactly k,
and that threshold is exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_train.saes.base import SAEConfigError, SAEOutput, fraction_of_variance_unexplained
from sae_train.saes.topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    kind: str = "batchtopk"
    # Exponential moving average factor of the inference threshold estimate.
    threshold_momentum: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.threshold_momentum < 1:
            raise SAEConfigError("sae.threshold_momentum must be in [0, 1)")


class BatchTopKSAE(TopKSAE):
    config_class = BatchTopKConfig
    config: BatchTopKConfig

    def __init__(self, config: BatchTopKConfig, d_in: int):
        super().__init__(config, d_in)
        # Scaled units; negative = not estimated yet (eval falls back to batch top-k).
        self.register_buffer("threshold", torch.full((), -1.0))

    def batch_codes(self, pre_acts: Tensor) -> Tensor:
        """Dense codes keeping the k × batch largest relu'd pre-activations of the batch."""
        flat = pre_acts.reshape(-1)
        keep = min(self.k * pre_acts.shape[0], flat.numel())
        values, indices = flat.topk(keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre_acts)

    @torch.no_grad()
    def _track_threshold(self, codes: Tensor) -> None:
        positive = codes[codes > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min().to(self.threshold.dtype)
        if self.threshold < 0:
            self.threshold.copy_(smallest)
        else:
            m = self.config.threshold_momentum
            self.threshold.mul_(m).add_((1 - m) * smallest)

    @torch.no_grad()
    def calibrate_threshold(self, x: Tensor) -> None:
        """Set the inference threshold so that, on ``x`` (n, d_in) raw activations, exactly k
        latents per token fire on average (the same L0 as training)."""
        pre_acts = F.relu(self.pre_activations(x)).reshape(-1)
        keep = min(self.k * x.shape[0], pre_acts.numel())
        smallest_kept = pre_acts.topk(keep, sorted=False).values.min()
        self.threshold.copy_(smallest_kept.to(self.threshold.dtype))

    def threshold_codes(self, pre_acts: Tensor) -> Tensor:
        if self.threshold < 0:
            return self.batch_codes(pre_acts)
        return pre_acts * (pre_acts > self.threshold)

    def encode(self, x: Tensor) -> Tensor:
        return self.threshold_codes(F.relu(self.pre_activations(x)))

    def forward(self, x: Tensor, *, dead_mask: Optional[Tensor] = None,
                sparsity_scale: float = 1.0) -> SAEOutput:
        x_scaled = self.scale_input(x)
        pre_acts = F.relu(F.linear(x_scaled - self.b_dec, self.encoder_weight, self.b_enc))
        if self.training:
            codes = self.batch_codes(pre_acts)
            self._track_threshold(codes)
        else:
            codes = self.threshold_codes(pre_acts)
        recon_scaled = codes.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        losses = {"fvu": fraction_of_variance_unexplained(x_scaled, recon_scaled)}
        if self.training and self.config.aux_k_coefficient > 0:
            losses["auxk"] = self.auxk_loss(pre_acts, dead_mask, x_scaled - recon_scaled,
                                            self.aux_k, self.config.aux_k_coefficient)
        return SAEOutput(recon_scaled / self.input_scale, codes, None, losses)

    def folded_state(self) -> dict[str, Tensor]:
        state = super().folded_state()
        # Exported per latent (the JumpReLU layout other readers expect).
        state["threshold"] = (self.threshold / self.input_scale).expand(self.n_latents).clone()
        return state

    @torch.no_grad()
    def load_folded_state(self, state: dict[str, Tensor]) -> None:
        super().load_folded_state(state)
        if "threshold" in state:
            threshold = state["threshold"].reshape(-1)
            if not torch.allclose(threshold, threshold[0].expand_as(threshold)):
                raise ValueError("a batchtopk SAE has one inference threshold; this file has "
                                 "per-latent thresholds (load it as jumprelu)")
            self.threshold.fill_(float(threshold[0]))
