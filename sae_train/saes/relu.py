"""ReLU SAE with an L1 penalty weighted by decoder row norms (Anthropic, April 2024 update).

The penalty is λ · E_tokens[Σ_j z_j ‖d_j‖] / √d_in on the scaled input (E‖x‖ = √d_in), next to
an FVU reconstruction term. Both are in the same units whatever the layer's scale or width: all-
zero codes cost FVU ≈ 1, and codes that spend about one input norm on latents cost about λ (a
latent survives only if it explains more than about λ/2 of a token's norm, so λ of order 1 or
more kills most latents). The paper's setup got this wrong: an L1 of 5e-3 on a sum over latents
against an MSE *averaged over dimensions* (÷ d) makes all-zero codes optimal (see FACTS.md).

``tied=True`` is the paper's tied-weight variant: the encoder uses the decoder matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from sae_train.saes.base import (SAEConfig, SAEConfigError, SAEOutput, SparseAutoencoder,
                                 fraction_of_variance_unexplained)


@dataclass
class ReLUConfig(SAEConfig):
    kind: str = "relu"
    # λ of the decoder-norm-weighted L1 penalty (see the module docstring for its units).
    l1_coefficient: float = 0.1
    # Encoder weights tied to the decoder (the paper's variant).
    tied: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1_coefficient < 0:
            raise SAEConfigError("sae.l1_coefficient must be ≥ 0")


class ReLUSAE(SparseAutoencoder):
    config_class = ReLUConfig
    config: ReLUConfig

    def __init__(self, config: ReLUConfig, d_in: int):
        super().__init__(config, d_in)
        if config.tied:
            del self.W_enc  # the encoder reads W_dec (see encoder_weight)

    @property
    def encoder_weight(self) -> Tensor:
        return self.W_dec if self.config.tied else self.W_enc

    def encode(self, x: Tensor) -> Tensor:
        return F.relu(self.pre_activations(x))

    def forward(self, x: Tensor, *, dead_mask: Optional[Tensor] = None,
                sparsity_scale: float = 1.0) -> SAEOutput:
        x_scaled = self.scale_input(x)
        codes = F.relu(F.linear(x_scaled - self.b_dec, self.encoder_weight, self.b_enc))
        recon_scaled = codes @ self.W_dec + self.b_dec
        weighted_l1 = (codes * self.W_dec.norm(dim=1)).sum(-1).mean() / math.sqrt(self.d_in)
        losses = {"fvu": fraction_of_variance_unexplained(x_scaled, recon_scaled),
                  "l1": sparsity_scale * self.config.l1_coefficient * weighted_l1}
        return SAEOutput(recon_scaled / self.input_scale, codes, None, losses)
