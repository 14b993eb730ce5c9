"""The fast TopK training paths (sparse_ops, the in-place decoder projection) against the plain
autograd ones: outputs, every gradient, and the weights after fused-Adam steps, AuxK included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sae_train.saes import build_sae
from sae_train.saes.sparse_ops import (dense_decode, dense_topk_encode, group_by_latent,
                                       sparse_decode, sparse_topk_encode, topk_groups)
from sae_train.training.module import make_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tensors(seed: int = 0, batch: int = 48, d: int = 12, n_latents: int = 70):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, d, generator=g), "w_enc": torch.randn(n_latents, d, generator=g),
            "b_enc": 0.1 * torch.randn(n_latents, generator=g),
            "w_dec": torch.randn(n_latents, d, generator=g), "center": torch.randn(d, generator=g),
            "target": torch.randn(batch, d, generator=g)}


@pytest.mark.parametrize("with_aux", [False, True])
def test_encode_decode_with_center_and_input_gradients(with_aux):
    t = _tensors()

    def run(encode, decode):
        leaves = {n: t[n].clone().requires_grad_() for n in ("x", "w_enc", "b_enc", "w_dec",
                                                               "center")}
        values, indices, pre_acts = encode(leaves["x"], leaves["w_enc"], leaves["b_enc"], 5,
                                           center=leaves["center"])
        loss = (decode(values, indices, leaves["w_dec"]) + leaves["center"]
                - t["target"]).pow(2).sum()
        if with_aux:  # AuxK-style: top 9 of the "dead" half, relu after the selection
            aux_values, aux_indices = pre_acts.masked_fill(
                torch.arange(70) < 35, float("-inf")).topk(9)
            loss = loss + decode(F.relu(aux_values), aux_indices, leaves["w_dec"]).pow(2).sum()
        loss.backward()
        return [loss.detach(), values.detach(), pre_acts.detach()] + \
            [leaves[n].grad for n in ("x", "w_enc", "b_enc", "w_dec", "center")]

    fast = run(sparse_topk_encode, sparse_decode)
    reference = run(dense_topk_encode, dense_decode)
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert all(g.abs().sum() > 0 for g in reference[3:])  # every gradient is exercised


def test_group_by_latent_is_a_csr_of_the_selections():
    indices = torch.tensor([[3, 0, 5], [5, 3, 1], [2, 5, 0]])
    groups = topk_groups(indices, 7)
    assert groups.offsets.tolist() == [0, 2, 3, 4, 6, 6, 9, 9]
    flat = indices.reshape(-1)
    for latent in range(7):
        members = groups.order[groups.offsets[latent]:groups.offsets[latent + 1]]
        assert (flat[members] == latent).all()
        assert torch.equal(groups.tokens[groups.offsets[latent]:groups.offsets[latent + 1]],
                           members // 3)
    # Swapping the roles groups by token instead.
    by_token = group_by_latent(torch.tensor([2, 0, 2, 1]), torch.tensor([7, 8, 9, 6]), 3)
    assert by_token.offsets.tolist() == [0, 1, 2, 4]
    assert by_token.tokens.tolist() == [8, 6, 7, 9]


def test_in_place_decoder_projection_matches_the_formula():
    sae = build_sae({"kind": "topk", "n_latents": 40, "k": 4}, 10)
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(40, 10, generator=g)
    sae.W_dec.grad = grad.clone()
    sae.remove_parallel_decoder_grad()
    w = sae.W_dec.detach()
    expected = grad - (grad * w).sum(1, keepdim=True) * w
    torch.testing.assert_close(sae.W_dec.grad, expected)
    assert (grad * w).sum(1).abs().max() > 0.1  # the projection removed something


def _train(impl: str, x: torch.Tensor, dead: torch.Tensor, steps: int = 6):
    torch.manual_seed(0)
    sae = build_sae({"kind": "topk", "n_latents": 64, "k": 4, "aux_k": 8, "impl": impl},
                    x.shape[1])
    sae.initialize_from_data(x)
    optimizer = make_optimizer(sae.parameters(), 3e-3)  # the fused Adam sae-train uses
    losses = []
    for _ in range(steps):
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.after_optimizer_step()
        losses.append({k: float(v) for k, v in out.losses.items()})
    return sae, losses


def test_sparse_impl_trains_like_dense_with_auxk_and_fused_adam():
    g = torch.Generator().manual_seed(4)
    x = 20.0 * torch.randn(96, 16, generator=g) + 3.0
    dead = torch.arange(64) % 3 == 0  # AuxK active on a third of the latents
    fast, fast_losses = _train("sparse", x, dead)
    reference, reference_losses = _train("dense", x, dead)
    assert fast_losses[0]["auxk"] > 0
    for a, b in zip(fast_losses, reference_losses):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(reference.W_enc, _train("dense", x, dead, steps=0)[0].W_enc)
