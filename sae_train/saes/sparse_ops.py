"""Sparse kernels for top-k SAEs: the one place where speed tricks live.

A top-k SAE touches only k of n_latents latents per token, yet the plain autograd graph runs
three dense (batch × n_latents × d) matmuls per step besides the encoder's forward one (dense
decode, its weight gradient, the encoder's weight gradient), and keeps dense
(batch, n_latents) intermediates for them. Here every gradient is computed from the selected
latents only:

- decode: an ``embedding_bag`` (a weighted sum of k decoder rows per token);
- weight gradients: the selections are grouped by latent once (:func:`group_by_latent`); each
  latent's gradient row is then the weighted sum of the (batch, d) rows of the tokens that chose
  it, one ``embedding_bag`` with a bag per latent. It gathers from the small (batch, d) matrix
  (cache-resident) and writes the (n_latents, d) gradient once, with no zero fill;
- the decoder's value gradient ⟨W_dec[latent], grad_out[token]⟩ falls out of the same
  ``embedding_bag``'s per-sample-weight gradient (one pass over W_dec in row order);
- the encoder's bias and b_dec gradients: since x_c = x − b_dec, ∂L/∂b_dec = −(∂L/∂b_enc) W_enc,
  a vector–matrix product instead of a (batch, d) gather of k encoder rows per token.

The encoder's forward matmul stays dense (every pre-activation is needed to pick the top k);
the relu is applied to the k selected values only (top-k commutes with relu up to which zero
is picked, and a zero decodes to nothing). AuxK's gradient, which arrives densely on the
pre-activations, is reduced to its nonzero entries before it reaches the weights.
:func:`dense_topk_encode` / :func:`dense_decode` are the plain-autograd references the tests
compare against (outputs, gradients and optimizer updates).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class LatentGroups(NamedTuple):
    """Selections (token, latent, weight slot) grouped by latent, in CSR layout."""

    # (nnz,) positions into the flat list of selections, latent by latent.
    order: Tensor
    # (nnz,) the token of each grouped selection.
    tokens: Tensor
    # (n_latents + 1,) where each latent's group starts (last entry: nnz).
    offsets: Tensor


def group_by_latent(latents: Tensor, tokens: Tensor, n_latents: int) -> LatentGroups:
    """Group the selections ``latents[j]`` (made by token ``tokens[j]``) by latent.

    The roles can be swapped: ``group_by_latent(tokens, latents, batch)`` groups by token.
    """
    order = _stable_argsort(latents)
    offsets = torch.zeros(n_latents + 1, dtype=torch.long, device=latents.device)
    torch.cumsum(torch.bincount(latents, minlength=n_latents), 0, out=offsets[1:])
    return LatentGroups(order, tokens[order], offsets)


def _stable_argsort(keys: Tensor) -> Tensor:
    # On CPU numpy's argsort of ~10⁵ int64 keys took ~9 ms where torch's took ~190 ms (torch
    # 2.13, 2 cores); the result is the same permutation (both stable).
    if keys.device.type == "cpu":
        return torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))
    return torch.argsort(keys, stable=True)


def topk_groups(indices: Tensor, n_latents: int) -> LatentGroups:
    """:func:`group_by_latent` for (batch, k) top-k indices (selection j = row j // k)."""
    batch, k = indices.shape
    tokens = torch.arange(batch, device=indices.device).repeat_interleave(k)
    return group_by_latent(indices.reshape(-1), tokens, n_latents)


def _per_latent_sum(groups: LatentGroups, rows: Tensor, weights: Tensor) -> Tensor:
    """(n_latents, d): Σ over each latent's selections of weight · rows[token]."""
    # The aten op itself: under no_grad F.embedding_bag picks a "forward only" kernel that was
    # 3-4x slower for many small bags on CPU (torch 2.13); this one computes the same sums.
    out, *_ = torch.ops.aten._embedding_bag(
        rows, groups.tokens, groups.offsets, False, 0, False,
        weights[groups.order].to(rows.dtype), True, -1)
    return out


def _nonzero_selections(grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(latents, tokens, float32 values) of the nonzero entries of a (batch, n_latents) grad."""
    tokens, latents = grad.nonzero(as_tuple=True)
    return latents, tokens, grad[tokens, latents].to(torch.float32)


class _TopKEncode(torch.autograd.Function):
    """relu-top-k of (x − center) W_encᵀ + b_enc → (values, indices, pre-activations).

    The pre-activations (before the relu) are returned for AuxK; a gradient arriving on them
    (nonzero only at the AuxK latents) is reduced to its nonzero entries and applied sparsely.
    """

    @staticmethod
    def forward(ctx, x: Tensor, center: Optional[Tensor], weight: Tensor, bias: Tensor, k: int):
        x_centered = x if center is None else x - center
        pre_acts = F.linear(x_centered, weight, bias)
        top, indices = pre_acts.topk(k, dim=-1, sorted=False)
        values = F.relu(top)
        ctx.save_for_backward(x_centered, weight, values, indices)
        ctx.has_center = center is not None
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        return values, indices, pre_acts

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_pre_acts):
        x_centered, weight, values, indices = ctx.saved_tensors
        n_latents = weight.shape[0]
        needs_x, needs_center, needs_w, needs_b = ctx.needs_input_grad[:4]
        x = x_centered.to(torch.float32)
        w = weight.to(torch.float32)
        latents, tokens, g = [], [], []  # every selection with a gradient
        if grad_values is not None:
            latents.append(indices.reshape(-1))
            tokens.append(torch.arange(len(x), device=x.device).repeat_interleave(
                indices.shape[1]))
            g.append((grad_values.to(torch.float32) * (values > 0)).reshape(-1))  # relu
        if grad_pre_acts is not None:  # AuxK: a few nonzero entries per token
            aux = _nonzero_selections(grad_pre_acts)
            latents.append(aux[0]), tokens.append(aux[1]), g.append(aux[2])
        if not g:
            return None, None, None, None, None
        latents, tokens, g = torch.cat(latents), torch.cat(tokens), torch.cat(g)
        grad_x = grad_center = grad_w = None
        grad_b = torch.zeros(n_latents, dtype=torch.float32, device=w.device)
        grad_b.index_add_(0, latents, g)
        if needs_w:
            grad_w = _per_latent_sum(group_by_latent(latents, tokens, n_latents), x, g)
            grad_w = grad_w.to(weight.dtype)
        if needs_x:
            by_token = group_by_latent(tokens, latents, len(x))
            grad_x = _per_latent_sum(by_token, w, g).to(x_centered.dtype)
        if needs_center and ctx.has_center:  # x_c = x − center: −Σ_tokens ∂L/∂x_c
            grad_center = -(grad_b @ w).to(x_centered.dtype)
        return grad_x, grad_center, grad_w, (grad_b.to(weight.dtype) if needs_b else None), None


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
        groups = topk_groups(indices, weight.shape[0])
        grad_out = grad_out.to(weight.dtype)
        # One embedding_bag, a bag per latent: its output is W_dec's gradient, and its
        # per-sample-weight gradient against W_dec is ⟨W_dec[latent], grad_out[token]⟩.
        with torch.enable_grad():
            weights = values.reshape(-1)[groups.order].detach().requires_grad_()
            grad_weight = F.embedding_bag(groups.tokens, grad_out, groups.offsets, mode="sum",
                                          per_sample_weights=weights, include_last_offset=True)
        grad_values = None
        if ctx.needs_input_grad[0]:
            (sorted_grad,) = torch.autograd.grad(grad_weight, weights, weight.detach())
            grad_values = torch.empty_like(sorted_grad).index_copy_(0, groups.order, sorted_grad)
            grad_values = grad_values.view_as(values)
        return grad_values, None, grad_weight.detach() if ctx.needs_input_grad[2] else None


def sparse_topk_encode(x: Tensor, weight: Tensor, bias: Tensor, k: int,
                       center: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(batch, d) inputs → (values (batch, k), indices (batch, k), pre-activations
    (batch, n_latents), before the relu) of relu((x − center) weightᵀ + bias); sparse backward."""
    return _TopKEncode.apply(x, center, weight, bias, k)


def sparse_decode(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """(batch, k) values at (batch, k) indices of ``weight`` (n_latents, d) → (batch, d)."""
    return _SparseDecode.apply(values, indices, weight)


def dense_topk_encode(x: Tensor, weight: Tensor, bias: Tensor, k: int,
                      center: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Reference for :func:`sparse_topk_encode`: plain autograd."""
    pre_acts = F.linear(x if center is None else x - center, weight, bias)
    top, indices = pre_acts.topk(k, dim=-1, sorted=False)
    return F.relu(top), indices, pre_acts


def dense_decode(values: Tensor, indices: Tensor, weight: Tensor) -> Tensor:
    """Reference for :func:`sparse_decode`: scatter into dense codes, then a matmul."""
    codes = values.new_zeros(values.shape[0], weight.shape[0]).scatter(1, indices, values)
    return codes.to(weight.dtype) @ weight
