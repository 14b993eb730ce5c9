"""What every SAE architecture shares: parameters, input scaling, unit-norm decoder, AuxK.

Conventions (all architectures):

- ``W_enc`` is ``(n_latents, d_in)`` (an ``nn.Linear`` weight), ``W_dec`` is ``(n_latents, d_in)``:
  row ``j`` of ``W_dec`` is latent ``j``'s decoder direction (unit norm unless configured off).
- The SAE takes **raw** activations. Internally it multiplies them by a scalar ``input_scale``
  (√d / E‖x‖, estimated before training) so that hyper-parameters mean the same at every layer;
  its reconstruction is divided by the same scale. :meth:`fold_input_scale` rewrites the weights so
  that ``input_scale == 1`` with identical reconstructions (the exported form).
- Latent values are in the scaled units while ``input_scale != 1`` and in raw units after folding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SAEConfigError(ValueError):
    """An SAE configuration that cannot work (names the field and what to do)."""


@dataclass
class SAEConfig:
    """Fields shared by every architecture (the ``sae`` config group)."""

    # Architecture name in the registry: topk, batchtopk, relu, jumprelu.
    kind: str = "topk"
    # Dictionary size; None means expansion_factor × d_in.
    n_latents: Optional[int] = None
    # Used only when n_latents is None.
    expansion_factor: int = 16
    # Initial decoder bias: geometric_median or mean of a data sample, or zeros.
    b_dec_init: str = "geometric_median"
    # Multiply inputs by √d / E‖x‖ during training (folded into the weights at export).
    normalize_input: bool = True
    # Keep decoder rows at unit norm (gradient parallel to each row removed, renormalised
    # after every optimizer step).
    unit_norm_decoder: bool = True

    def __post_init__(self) -> None:
        if self.n_latents is not None and self.n_latents <= 0:
            raise SAEConfigError(f"sae.n_latents must be positive, got {self.n_latents}")
        if self.expansion_factor <= 0:
            raise SAEConfigError(f"sae.expansion_factor must be positive, got {self.expansion_factor}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise SAEConfigError(f"sae.b_dec_init={self.b_dec_init!r}: use geometric_median, mean "
                                 "or zeros")

    def latents_for(self, d_in: int) -> int:
        return int(self.n_latents) if self.n_latents is not None else self.expansion_factor * d_in

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class SAEOutput(NamedTuple):
    """What :meth:`SparseAutoencoder.forward` returns."""

    # (batch, d_in), raw units: what replaces the input.
    reconstruction: Tensor
    # (batch, k) values of the selected latents, or (batch, n_latents) dense codes.
    latent_values: Tensor
    # (batch, k) indices into the dictionary, or None when latent_values are dense codes.
    latent_indices: Optional[Tensor]
    # Weighted loss terms ("fvu", and e.g. "auxk", "l1", "l0"); their sum is the training loss.
    losses: dict

    @property
    def loss(self) -> Tensor:
        return sum(self.losses.values())

    def l0(self) -> Tensor:
        """(batch,) number of latents that fired for each token."""
        return (self.latent_values != 0).sum(-1)

    def fire_counts(self, n_latents: int) -> Tensor:
        """(n_latents,) number of tokens each latent fired for (no dense matrix for top-k)."""
        fired = self.latent_values != 0
        if self.latent_indices is None:
            return fired.sum(0)
        return torch.bincount(self.latent_indices[fired], minlength=n_latents)

    def active(self, n_latents: int) -> Tensor:
        """(batch, n_latents) bool: which latents fired for each token."""
        if self.latent_indices is None:
            return self.latent_values != 0
        fired = torch.zeros(self.latent_values.shape[0], n_latents, dtype=torch.bool,
                            device=self.latent_values.device)
        return fired.scatter_(1, self.latent_indices, self.latent_values != 0)

    def dense_codes(self, n_latents: int) -> Tensor:
        """(batch, n_latents) codes, zeros where a latent did not fire."""
        if self.latent_indices is None:
            return self.latent_values
        codes = self.latent_values.new_zeros(self.latent_values.shape[0], n_latents)
        return codes.scatter_(1, self.latent_indices, self.latent_values)


def fraction_of_variance_unexplained(x: Tensor, reconstruction: Tensor) -> Tensor:
    """Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the batch (scale-invariant; 1 = predicting the mean)."""
    total_variance = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return (x - reconstruction).pow(2).sum() / total_variance


class SparseAutoencoder(nn.Module):
    """Base class; subclasses implement :meth:`forward` and :meth:`encode` for their activation.

    ``config`` is the architecture's config dataclass; ``d_in`` the activation width.
    """

    config_class = SAEConfig
    #: Top-k kinds train dead latents with the AuxK loss and need a dead-latent mask.
    uses_dead_mask = False

    def __init__(self, config: SAEConfig, d_in: int):
        super().__init__()
        if d_in <= 0:
            raise SAEConfigError(f"d_in must be positive, got {d_in}")
        self.config = config
        self.d_in = int(d_in)
        self.n_latents = config.latents_for(d_in)
        directions = torch.randn(self.n_latents, self.d_in)
        directions /= directions.norm(dim=1, keepdim=True)
        # W_dec starts as W_encᵀ (in this layout: the same rows), both unit norm.
        self.W_enc = nn.Parameter(directions.clone())
        self.b_enc = nn.Parameter(torch.zeros(self.n_latents))
        self.W_dec = nn.Parameter(directions)
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))
        self.register_buffer("input_scale", torch.ones(()))

    # ------------------------------------------------------------------ math
    @property
    def encoder_weight(self) -> Tensor:
        """(n_latents, d_in); tied variants return the decoder here."""
        return self.W_enc

    def scale_input(self, x: Tensor) -> Tensor:
        return x.to(self.W_dec.dtype) * self.input_scale

    def pre_activations(self, x: Tensor) -> Tensor:
        """(batch, d_in) raw → (batch, n_latents) pre-activations in scaled units."""
        return F.linear(self.scale_input(x) - self.b_dec, self.encoder_weight, self.b_enc)

    def decode(self, codes: Tensor) -> Tensor:
        """(batch, n_latents) codes → (batch, d_in) reconstruction in raw units."""
        return (codes.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.input_scale

    def encode(self, x: Tensor) -> Tensor:
        """(batch, d_in) raw activations → (batch, n_latents) codes (inference behaviour)."""
        raise NotImplementedError

    def forward(self, x: Tensor, *, dead_mask: Optional[Tensor] = None,
                sparsity_scale: float = 1.0) -> SAEOutput:
        """Encode and decode ``x`` (batch, d_in) and compute the loss terms.

        ``dead_mask`` (n_latents,) bool marks latents that have not fired for a while (AuxK);
        ``sparsity_scale`` ∈ [0, 1] multiplies the sparsity penalty (its warm-up).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ shared losses
    def auxk_loss(self, pre_acts: Tensor, dead_mask: Optional[Tensor], residual: Tensor,
                  k_aux: int, coefficient: float) -> Tensor:
        """AuxK (Gao et al. 2024): the top ``k_aux`` dead latents predict the main residual.

        ``residual`` (batch, d_in) is x − x̂ in scaled units; it is detached so this loss only
        trains the dead latents. Normalised like FVU and scaled down when few latents are dead.
        """
        zero = pre_acts.new_zeros(())
        if dead_mask is None or coefficient == 0:
            return zero
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return zero
        k = min(k_aux, n_dead)
        masked = pre_acts.masked_fill(~dead_mask, float("-inf"))
        values, indices = masked.topk(k, dim=-1, sorted=False)
        values = F.relu(values)
        residual = residual.detach()
        predicted = self.decode_sparse_scaled(values, indices)
        total_variance = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        loss = (predicted - residual).pow(2).sum() / total_variance
        return coefficient * min(n_dead / k_aux, 1.0) * loss

    def decode_sparse_scaled(self, values: Tensor, indices: Tensor) -> Tensor:
        """Σ_i values[:, i] · W_dec[indices[:, i]] (no bias, scaled units)."""
        codes = values.new_zeros(values.shape[0], self.n_latents).scatter(1, indices, values)
        return codes @ self.W_dec

    # ------------------------------------------------------------------ constraints
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (no-op when unit_norm_decoder is off)."""
        if self.config.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row, so a step moves the
        direction rather than the norm that :meth:`normalize_decoder` would undo anyway."""
        if not self.config.unit_norm_decoder or self.W_dec.grad is None:
            return
        parallel = einops.einsum(self.W_dec.grad, self.W_dec, "latent d, latent d -> latent")
        # In place (no (n_latents, d) temporary): grad −= parallel · W_dec.
        self.W_dec.grad.addcmul_(parallel.unsqueeze(1), self.W_dec, value=-1)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Re-impose constraints after a parameter update."""
        self.normalize_decoder()

    # ------------------------------------------------------------------ data-dependent init
    @torch.no_grad()
    def initialize_from_data(self, sample: Tensor) -> None:
        """Set ``input_scale`` and ``b_dec`` from a (n, d_in) sample of raw activations."""
        sample = sample.to(torch.float32)
        if self.config.normalize_input:
            self.input_scale.fill_(input_scale_from_sample(sample))
        scaled = sample * self.input_scale
        if self.config.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(scaled))
        elif self.config.b_dec_init == "mean":
            self.b_dec.copy_(scaled.mean(0))
        else:
            self.b_dec.zero_()

    # ------------------------------------------------------------------ export
    def folded_state(self) -> dict[str, Tensor]:
        """Tensors of an equivalent SAE with ``input_scale == 1`` (see module docstring)."""
        s = self.input_scale
        return {"W_enc": self.encoder_weight.detach().clone(),
                "b_enc": (self.b_enc / s).detach().clone(),
                "W_dec": self.W_dec.detach().clone(),
                "b_dec": (self.b_dec / s).detach().clone()}

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Make this SAE take raw activations with ``input_scale == 1`` (same reconstructions)."""
        state = self.folded_state()
        self.load_folded_state(state)

    @torch.no_grad()
    def load_folded_state(self, state: dict[str, Tensor]) -> None:
        """Load tensors in the exported layout (input_scale 1)."""
        for name in ("b_enc", "W_dec", "b_dec"):
            getattr(self, name).copy_(state[name])
        if "W_enc" in self._parameters:
            self.W_enc.copy_(state["W_enc"])
        self.input_scale.fill_(1.0)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, n_latents={self.n_latents}, kind={self.config.kind!r}"


def input_scale_from_sample(sample: Tensor) -> float:
    """√d / E‖x‖: after scaling, the mean token norm is √d (each dimension is O(1))."""
    mean_norm = sample.to(torch.float32).norm(dim=1).mean().item()
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise ValueError(f"cannot estimate the input scale: mean activation norm is {mean_norm}")
    return math.sqrt(sample.shape[1]) / mean_norm


def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-7) -> Tensor:
    """The point minimising the summed Euclidean distance to ``points`` (n, d) (Weiszfeld).

    Robust to the outlier tokens (huge norms) that pull the mean away from typical activations.
    Each iteration is two matrix-vector products (‖x − m‖² = ‖x‖² − 2 x·m + ‖m‖²) rather than
    an (n, d) difference and weighted copy: 2.7× faster on 32k × 640 points (one thread).
    """
    x = points.to(torch.float64)
    squares = (x * x).sum(1)
    median = x.mean(0)
    for _ in range(max_iter):
        distance_sq = (squares - 2 * (x @ median) + median @ median).clamp_min(1e-24)
        weights = distance_sq.rsqrt()
        new = (weights @ x) / weights.sum()
        moved = (new - median).norm()
        median = new
        if moved <= tol * median.norm().clamp_min(1.0):
            break
    return median.to(points.dtype)
