"""Sparse kernels for top-k SAEs: the one place where speed tricks live.

A top-k SAE touches only k of n_latents latents per token, yet the plain autograd graph runs
three dense (batch × n_latents × d) matmuls per step besides the encoder's forward one (dense
decode, its weight gradient, the encoder's weight gradient). Here every gradient is computed
from the k selected latents only:

- decode: an ``embedding_bag`` (a weighted sum of k decoder rows per token);
- weight gradients: a (n_latents × batch) CSR matrix with k entries per token times a dense
  (batch × d) matrix;
- input / value / bias gradients: ``embedding_bag`` (forward, and its per-sample-weight
  gradient) and ``index_add``.

The encoder's forward matmul stays dense (every pre-activation is needed to pick the top k).
:func:`dense_topk_encode` / :func:`dense_decode` are the reference implementations the tests
compare against (values and gradients).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

def _latent_major(indices: Tensor, n_latents: int, weights: Tensor) -> Tensor:
    """(n_latents, batch) CSR matrix S with S[indices[b, i], b] = weights[b, i].

    ``S @ dense`` accumulates, for every latent, the weighted rows of the tokens that selected
    it: the weight gradient of a sparse encoder/decoder without a dense (batch, n_latents) step.
    """
    batch, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = torch.arange(batch, device=indices.device).repeat_interleave(k)[order]
    counts = torch.bincount(flat, minlength=n_latents)
    crow = torch.zeros(n_latents + 1, dtype=torch.long, device=indices.device)
    crow[1:] = counts.cumsum(0)
    values = weights.reshape(-1)[order]
    with warnings.catch_warnings():  # CSR works on CPU and CUDA; its "beta" notice is noise
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, tokens, values, (n_latents, batch),
                                       check_invariants=False)


def _gather_dot(rows: Tensor, indices: Tensor, vectors: Tensor) -> Tensor:
    """out[b, i] = ⟨rows[indices[b, i]], vectors[b]⟩ without materialising (batch, k, d).

    This is the gradient of an embedding bag with respect to its per-sample weights; autograd
    has a kernel for exactly that (about 5x faster on CPU than gathering the rows).
    """
    with torch.enable_grad():
        weights = torch.ones(indices.shape, dtype=rows.dtype, device=rows.device,
                             requires_grad=True)
        bag = F.embedding_bag(indices, rows.detach(), per_sample_weights=weights, mode="sum")
        (out,) = torch.autograd.grad(bag, weights, vectors.to(rows.dtype))
    return out.to(vectors.dtype)


class _TopKEncode(torch.autograd.Function):
    """relu(x_c W_encᵀ + b_enc) → top-k (values, indices) and the full pre-activations.

    The pre-activations are returned for AuxK; a gradient arriving on them (only at the AuxK
    latents) is applied densely, while the main top-k path stays sparse.
    """

    @staticmethod
    def forward(ctx, x_centered: Tensor, weight: Tensor, bias: Tensor, k: int):
        pre_acts = F.relu(F.linear(x_centered, weight, bias))
        values, indices = pre_acts.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(x_centered, weight, values, indices)
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        return values, indices, pre_acts

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_pre_acts):
        x_centered, weight, values, indices = ctx.saved_tensors
        n_latents = weight.shape[0]
        x = x_centered.to(torch.float32)
        w = weight.to(torch.float32)
        grad_x = grad_w = grad_b = None
        if grad_values is not None:
            g = grad_values.to(torch.float32) * (values > 0)  # relu: no gradient at zero
            grad_x = F.embedding_bag(indices, w, per_sample_weights=g, mode="sum")
            grad_w = _latent_major(indices, n_latents, g) @ x
            grad_b = torch.zeros(n_latents, dtype=torch.float32, device=w.device)
            grad_b.index_add_(0, indices.reshape(-1), g.reshape(-1))
        if grad_pre_acts is not None:  # AuxK; already zero where the relu was inactive
            g = grad_pre_acts.to(torch.float32)
            grad_x = g @ w if grad_x is None else grad_x.addmm_(g, w)
            grad_w = g.t() @ x if grad_w is None else grad_w.addmm_(g.t(), x)
            grad_b = g.sum(0) if grad_b is None else grad_b.add_(g.sum(0))
        if grad_x is None:
            return None, None, None, None
        return (grad_x.to(x_centered.dtype), grad_w.to(weight.dtype), grad_b.to(weight.dtype),
                None)


class _SparseDecode(torch.autograd.Function):
    """Σ_i values[:, i] · W_dec[indices[:, i]] with gradients for values and W_dec."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weight: Tensor):
        values = values.to(weight.dtype)
        ctx.save_for_backward(values, indices, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weight = ctx.saved_tensors
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_values = _gather_dot(weight, indices, grad_out)
        if ctx.needs_input_grad[2]:
            grad_weight = (_latent_major(indices, weight.shape[0], values.to(grad_out.dtype))
                           @ grad_out).to(weight.dtype)
        return grad_values, None, grad_weight


def sparse_topk_encode(x_centered: Tensor, weight: Tensor, bias: Tensor, k: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """(values (batch, k), indices (batch, k), pre_acts (batch, n_latents)), sparse backward."""
    return _TopKEncode.apply(x_centered, weight, bias, k)


def sparse_decode(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """(batch, k) values at (batch, k) indices of ``weight`` (n_latents, d) → (batch, d)."""
    return _SparseDecode.apply(values, indices, weight)


def dense_topk_encode(x_centered: Tensor, weight: Tensor, bias: Tensor, k: int
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Reference for :func:`sparse_topk_encode`: plain autograd."""
    pre_acts = F.relu(F.linear(x_centered, weight, bias))
    values, indices = pre_acts.topk(k, dim=-1, sorted=False)
    return values, indices, pre_acts


def dense_decode(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """Reference for :func:`sparse_decode`: scatter into dense codes, then a matmul."""
    codes = values.new_zeros(values.shape[0], weight.shape[0]).scatter(1, indices, values)
    return codes.to(weight.dtype) @ weight
