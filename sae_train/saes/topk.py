"""TopK SAE (Gao et al. 2024): keep the k largest (relu'd) pre-activations of each token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from sae_train.saes.base import (SAEConfig, SAEConfigError, SAEOutput, SparseAutoencoder,
                                 fraction_of_variance_unexplained)
from sae_train.saes.sparse_ops import (dense_decode, dense_topk_encode, sparse_decode,
                                       sparse_topk_encode)


@dataclass
class TopKConfig(SAEConfig):
    kind: str = "topk"
    # Active latents per token.
    k: int = 32
    # Dead latents used by the AuxK loss; None means d_in // 2 (the paper's heuristic).
    aux_k: Optional[int] = None
    # Weight of the AuxK loss (0 turns it off).
    aux_k_coefficient: float = 1 / 32
    # "sparse": gradients from the k selected latents only (sparse_ops); "dense": plain
    # autograd through dense codes (the reference; same numbers, slower).
    impl: str = "sparse"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k <= 0:
            raise SAEConfigError(f"sae.k must be positive, got {self.k}")
        if self.n_latents is not None and self.k > self.n_latents:
            raise SAEConfigError(f"sae.k={self.k} is larger than sae.n_latents={self.n_latents}; "
                                 "choose k ≤ n_latents")
        if self.aux_k is not None and self.aux_k <= 0:
            raise SAEConfigError(f"sae.aux_k must be positive or null, got {self.aux_k}")
        if self.aux_k_coefficient < 0:
            raise SAEConfigError("sae.aux_k_coefficient must be ≥ 0")
        if self.impl not in ("sparse", "dense"):
            raise SAEConfigError(f"sae.impl={self.impl!r}: use sparse or dense")


class TopKSAE(SparseAutoencoder):
    config_class = TopKConfig
    uses_dead_mask = True
    config: TopKConfig

    def __init__(self, config: TopKConfig, d_in: int):
        super().__init__(config, d_in)
        if config.k > self.n_latents:
            raise SAEConfigError(f"sae.k={config.k} is larger than the dictionary "
                                 f"({self.n_latents} latents = expansion_factor × d_in); "
                                 "choose k ≤ n_latents")
        self.k = config.k
        self.aux_k = config.aux_k or max(1, d_in // 2)

    def _kernels(self):
        if self.config.impl == "sparse":
            return sparse_topk_encode, sparse_decode
        return dense_topk_encode, dense_decode

    def select(self, x_scaled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scaled input → (values, indices, pre_acts) of the top k latents, scaled units.

        ``pre_acts`` are before the relu (AuxK applies it after its own selection)."""
        encode, _ = self._kernels()
        return encode(x_scaled, self.encoder_weight, self.b_enc, self.k, center=self.b_dec)

    def decode_sparse_scaled(self, values: Tensor, indices: Tensor) -> Tensor:
        _, decode = self._kernels()
        return decode(values, indices, self.W_dec)

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """(batch, k) values/indices → (batch, d_in) reconstruction in raw units."""
        return (self.decode_sparse_scaled(values, indices) + self.b_dec) / self.input_scale

    def encode(self, x: Tensor) -> Tensor:
        values, indices, _ = self.select(self.scale_input(x))
        return values.new_zeros(values.shape[0], self.n_latents).scatter_(1, indices, values)

    def forward(self, x: Tensor, *, dead_mask: Optional[Tensor] = None,
                sparsity_scale: float = 1.0) -> SAEOutput:
        x_scaled = self.scale_input(x)
        values, indices, pre_acts = self.select(x_scaled)
        recon_scaled = self.decode_sparse_scaled(values, indices) + self.b_dec
        residual = x_scaled - recon_scaled
        losses = {"fvu": fraction_of_variance_unexplained(x_scaled, recon_scaled)}
        if self.training and self.config.aux_k_coefficient > 0:
            losses["auxk"] = self.auxk_loss(pre_acts, dead_mask, residual, self.aux_k,
                                            self.config.aux_k_coefficient)
        return SAEOutput(recon_scaled / self.input_scale, values, indices, losses)
