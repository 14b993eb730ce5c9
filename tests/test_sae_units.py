"""SAE pieces on their own: sparse kernels vs the dense reference, the decoder constraint, scale
folding, save/load (ours, sparsify, SAELens), BatchTopK's threshold, JumpReLU's threshold
gradient, metrics pooled across updates."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sae_train.saes import (SAEConfigError, SAEFormatError, build_sae, geometric_median,
                            load_sae, save_sae)
from sae_train.saes.sparse_ops import (dense_decode, dense_topk_encode, sparse_decode,
                                       sparse_topk_encode)
from sae_train.training import default_learning_rate
from sae_train.training.metrics import (ExplainedVariance, FeatureDensity,
                                        FractionOfVarianceUnexplained, MeanL0, dead_fraction)
from test_sae_support import fvu, one_torch_thread  # noqa: F401

CONFIGS = {
    "topk": {"kind": "topk", "n_latents": 96, "k": 6},
    "topk_dense": {"kind": "topk", "n_latents": 96, "k": 6, "impl": "dense"},
    "batchtopk": {"kind": "batchtopk", "n_latents": 96, "k": 6},
    "relu": {"kind": "relu", "n_latents": 96},
    "relu_tied": {"kind": "relu", "n_latents": 96, "tied": True},
    "jumprelu": {"kind": "jumprelu", "n_latents": 96, "init_density": 0.1},
}


def _data(n: int = 512, d: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Raw activations far from unit scale, with an offset: folding and b_dec must both work.
    return 40.0 * torch.randn(n, d, generator=g) + 7.0


def _trained(config: dict, x: torch.Tensor, steps: int = 30):
    torch.manual_seed(0)
    sae = build_sae(config, x.shape[1])
    sae.initialize_from_data(x)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    dead = torch.zeros(sae.n_latents, dtype=torch.bool)
    for _ in range(steps):
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        opt.zero_grad()
        sae.after_optimizer_step()
    if hasattr(sae, "calibrate_threshold"):
        sae.calibrate_threshold(x)
    return sae.eval()


# ---------------------------------------------------------------------- kernels
def test_sae_output_counts_from_sparse_and_dense_codes():
    values = torch.tensor([[0.5, 0.0, 2.0], [1.0, 3.0, 0.0]])
    indices = torch.tensor([[4, 1, 0], [4, 2, 3]])
    from sae_train.saes import SAEOutput

    sparse = SAEOutput(torch.zeros(2, 3), values, indices, {})
    dense = SAEOutput(torch.zeros(2, 3), sparse.dense_codes(5), None, {})
    for out in (sparse, dense):
        assert out.l0().tolist() == [2, 2]
        assert out.fire_counts(5).tolist() == [1, 0, 1, 0, 2]
    assert torch.equal(sparse.active(5), dense.active(5))


@pytest.mark.parametrize("with_aux", [False, True])
def test_sparse_kernels_match_dense_reference(with_aux):
    g = torch.Generator().manual_seed(1)
    x, w_enc = torch.randn(64, 16, generator=g), torch.randn(80, 16, generator=g)
    b_enc, w_dec = 0.1 * torch.randn(80, generator=g), torch.randn(80, 16, generator=g)
    target = torch.randn(64, 16, generator=g)

    def run(encode, decode):
        leaves = [t.clone().requires_grad_() for t in (x, w_enc, b_enc, w_dec)]
        values, indices, pre_acts = encode(leaves[0], leaves[1], leaves[2], 5)
        loss = (decode(values, indices, leaves[3]) - target).pow(2).sum()
        if with_aux:  # AuxK-style second selection through the pre-activations
            aux_values, aux_indices = pre_acts.masked_fill(
                torch.arange(80) < 40, float("-inf")).topk(7)
            loss = loss + decode(F.relu(aux_values), aux_indices, leaves[3]).pow(2).sum()
        loss.backward()
        return [loss.detach(), values.detach()] + [t.grad for t in leaves]

    fast, reference = run(sparse_topk_encode, sparse_decode), run(dense_topk_encode, dense_decode)
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert reference[3].abs().sum() > 0  # gradients are not trivially zero


def test_topk_sparse_and_dense_impls_train_identically():
    x = _data()
    a = _trained(CONFIGS["topk"], x)
    b = _trained(CONFIGS["topk_dense"], x)
    for name, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[name], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- shared mechanics
def test_decoder_gradient_projection_and_renormalisation():
    sae = build_sae(CONFIGS["relu"], 24)
    x = _data()
    sae.initialize_from_data(x)
    sae(x).loss.backward()
    sae.remove_parallel_decoder_grad()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert parallel.abs().max() < 1e-6 * sae.W_dec.grad.norm()
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(96))


def test_initialisation_from_data():
    x = _data()
    sae = build_sae(CONFIGS["topk"], 24)
    torch.testing.assert_close(sae.W_dec, sae.W_enc)  # W_dec starts as W_encᵀ (row layout)
    sae.initialize_from_data(x)
    scale = float(sae.input_scale)
    assert scale == pytest.approx(math.sqrt(24) / x.norm(dim=1).mean().item(), rel=1e-5)
    torch.testing.assert_close(sae.b_dec / scale, geometric_median(x), rtol=1e-4, atol=1e-4)


def test_geometric_median_ignores_outliers():
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(900, 8, generator=g) + 5.0, torch.full((100, 8), 1000.0)])
    median = geometric_median(points)
    assert (median - 5.0).abs().max() < 0.5
    assert (points.mean(0) - 5.0).abs().min() > 90  # the mean is dragged away


def test_geometric_median_is_weiszfelds_point():
    """The matrix-vector form against the textbook iteration, and the optimum's condition:
    the unit vectors from the median to the points sum to ≈ 0."""
    g = torch.Generator().manual_seed(1)
    points = torch.randn(2000, 16, generator=g) * torch.linspace(0.5, 3, 16) + 2.0
    x = points.double()
    plain = x.mean(0)
    for _ in range(100):
        w = 1 / (x - plain).norm(dim=1).clamp_min(1e-12)
        plain = (w[:, None] * x).sum(0) / w.sum()
    median = geometric_median(points)
    torch.testing.assert_close(median.double(), plain, rtol=1e-6, atol=1e-6)
    pull = ((x - median.double()) / (x - median.double()).norm(dim=1, keepdim=True)).sum(0)
    assert pull.norm() < 1e-3 * len(points)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_saved_sae_takes_raw_activations_and_matches_training_time(name, tmp_path):
    x = _data()
    sae = _trained(CONFIGS[name], x, steps=150 if name == "relu_tied" else 30)  # tied learns slowly
    assert float(sae.input_scale) != pytest.approx(1.0)
    with torch.no_grad():
        before = sae(x)
    save_sae(sae, tmp_path / "s", metadata={"site": "layers.0.resid"})
    loaded = load_sae(tmp_path / "s")
    assert float(loaded.input_scale) == 1.0 and loaded.metadata["site"] == "layers.0.resid"
    with torch.no_grad():
        after = loaded(x)
    torch.testing.assert_close(after.reconstruction, before.reconstruction, rtol=1e-4, atol=1e-3)
    # Same latents fire; values are in raw units (divided by the training-time scale).
    s = float(sae.input_scale)
    torch.testing.assert_close(after.dense_codes(96), before.dense_codes(96) / s,
                               rtol=1e-4, atol=1e-4)
    assert fvu(x, after.reconstruction) < 0.9  # it learned something worth preserving


def test_sparsify_folder_loads(tmp_path):
    g = torch.Generator().manual_seed(3)
    enc_w, enc_b = torch.randn(40, 12, generator=g), torch.randn(40, generator=g)
    w_dec, b_dec = torch.randn(40, 12, generator=g), torch.randn(12, generator=g)
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec},
              str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "expansion_factor": 32, "normalize_decoder": True, "num_latents": 40, "k": 3,
        "multi_topk": False, "skip_connection": False, "d_in": 12}))
    sae = load_sae(tmp_path)
    x = torch.randn(10, 12, generator=g)
    pre = F.relu((x - b_dec) @ enc_w.T + enc_b)  # sparsify's encoder, written out
    values, indices = pre.topk(3)
    expected = (torch.zeros(10, 40).scatter(1, indices, values)) @ w_dec + b_dec
    torch.testing.assert_close(sae(x).reconstruction, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_saelens_folder_loads(architecture, tmp_path):
    g = torch.Generator().manual_seed(4)
    w_enc, b_enc = torch.randn(12, 40, generator=g), torch.randn(40, generator=g)  # (d_in, d_sae)
    w_dec, b_dec = torch.randn(40, 12, generator=g), torch.randn(12, generator=g)
    threshold = torch.rand(40, generator=g) * 2
    tensors = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    cfg = {"d_in": 12, "d_sae": 40, "architecture": architecture, "dtype": "float32",
           "apply_b_dec_to_input": architecture != "standard", "normalize_activations": "none"}
    if architecture == "jumprelu":
        tensors["threshold"] = threshold
    if architecture == "topk":
        cfg["k"] = 5
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path)
    x = 3 * torch.randn(10, 12, generator=g)
    centred = x - b_dec if cfg["apply_b_dec_to_input"] else x
    pre = centred @ w_enc + b_enc
    if architecture == "standard":
        codes = F.relu(pre)
    elif architecture == "jumprelu":
        codes = pre * (pre > threshold)
    else:
        values, indices = pre.topk(5)
        codes = torch.zeros(10, 40).scatter(1, indices, F.relu(values))
    torch.testing.assert_close(sae(x).reconstruction, codes @ w_dec + b_dec, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.encode(x), codes, rtol=1e-4, atol=1e-4)


def test_unreadable_folders_fail_clearly(tmp_path):
    with pytest.raises(SAEFormatError, match="cfg.json is missing"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "architecture": "gated"}))
    save_file({"W_enc": torch.zeros(4, 8)}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match="architecture 'gated' is not supported"):
        load_sae(tmp_path)


# ---------------------------------------------------------------------- architectures
def test_batchtopk_threshold_gives_k_per_token_at_inference():
    x = _data(2048)
    sae = _trained(CONFIGS["batchtopk"], x)
    l0 = sae(x).active(96).sum(1).float().mean().item()
    assert l0 == pytest.approx(6, abs=0.05)
    fresh = _data(2048, seed=1)  # new tokens from the same distribution
    assert sae(fresh).active(96).sum(1).float().mean().item() == pytest.approx(6, rel=0.2)


def test_jumprelu_thresholds_get_gradient_and_move():
    """The guard against frozen thresholds: started at a data quantile with a bandwidth sized for
    normalised inputs, most thresholds get a gradient at once and move under Adam; a too-narrow
    kernel (the known failure) starves them."""
    x, batch = _data(4096), _data(1024, seed=1)  # init sample, and a training batch
    torch.manual_seed(0)
    sae = build_sae(CONFIGS["jumprelu"], 24)
    sae.initialize_from_data(x)
    sae(batch).loss.backward()
    assert (sae.threshold.grad != 0).float().mean() > 0.8

    narrow = build_sae({**CONFIGS["jumprelu"], "bandwidth": 1e-5}, 24)
    narrow.initialize_from_data(x)
    narrow(batch).loss.backward()
    assert (narrow.threshold.grad != 0).float().mean() < 0.1

    start = sae.threshold.detach().clone()
    l0_start = sae(x).active(96).sum(1).float().mean().item()
    trained = _trained({**CONFIGS["jumprelu"], "l0_coefficient": 0.01}, x, steps=60)
    moved = (trained.threshold.detach() - start).abs()
    assert moved.mean() > 0.01  # Adam moves θ by at most ~lr·steps = 0.18
    assert trained(x).active(96).sum(1).float().mean().item() < 0.8 * l0_start
    assert trained.threshold.dtype == torch.float32


def test_relu_l1_is_decoder_norm_weighted():
    sae = build_sae({"kind": "relu", "n_latents": 8, "l1_coefficient": 0.5,
                     "unit_norm_decoder": False}, 4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8, 4))
        sae.W_dec.copy_(2 * torch.eye(8, 4))
    out = sae(torch.tensor([[1.0, 2.0, 0.0, 0.0]]))
    # codes (1, 2, 0, ...) × decoder norms 2 → 6; / √d_in = 3; × λ = 1.5
    assert float(out.losses["l1"]) == pytest.approx(1.5)


@pytest.mark.parametrize("config, message", [
    ({"kind": "topk", "n_latents": 8, "k": 9}, "sae.k=9 is larger than sae.n_latents=8"),
    ({"kind": "topk", "expansion_factor": 1, "k": 9}, "larger than the dictionary"),
    ({"kind": "wavelet"}, "unknown SAE kind 'wavelet'; available: topk, batchtopk, relu"),
    ({"kind": "topk", "l1_coefficient": 0.1}, "unknown keys \\['l1_coefficient'\\]"),
    ({"kind": "jumprelu", "bandwidth": 0.0}, "sae.bandwidth must be positive"),
])
def test_bad_sae_configs(config, message):
    with pytest.raises(SAEConfigError, match=message):
        build_sae(config, 4)


def test_default_learning_rate_scales_with_dictionary_size():
    assert default_learning_rate(2 ** 14) == pytest.approx(2e-4)
    assert default_learning_rate(2 ** 16) == pytest.approx(1e-4)


# ---------------------------------------------------------------------- metrics
def test_metrics_pool_updates_like_one_big_batch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 6, generator=g) * torch.arange(1, 7) + 2.0
    xhat = x + 0.3 * torch.randn(300, 6, generator=g) + 0.1
    active = torch.rand(300, 10, generator=g) < 0.2
    active[:, 9] = False
    metrics = [FractionOfVarianceUnexplained(6), ExplainedVariance(6), MeanL0(), FeatureDensity(10)]
    for part in (slice(0, 70), slice(70, 300)):  # uneven parts, like two ranks
        metrics[0].update(x[part], xhat[part])
        metrics[1].update(x[part], xhat[part])
        metrics[2].update(active[part].sum(1))
        metrics[3].update(active[part].sum(0), len(active[part]))
    assert float(metrics[0].compute()) == pytest.approx(fvu(x, xhat), rel=1e-5)
    error = (x - xhat).double()
    ev = 1 - error.var(0, unbiased=False).sum() / x.double().var(0, unbiased=False).sum()
    assert float(metrics[1].compute()) == pytest.approx(float(ev), rel=1e-5)
    assert float(metrics[2].compute()) == pytest.approx(active.sum(1).float().mean().item())
    density = metrics[3].compute()
    torch.testing.assert_close(density, active.double().mean(0))
    assert dead_fraction(density) == pytest.approx(0.1)


def test_auxk_trains_only_dead_latents_against_the_detached_residual():
    x = _data()
    torch.manual_seed(0)
    sae = build_sae({"kind": "topk", "n_latents": 96, "k": 6, "aux_k": 8,
                     "aux_k_coefficient": 1.0}, 24)
    sae.initialize_from_data(x)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[:30] = True
    out = sae(x, dead_mask=dead)
    assert set(out.losses) == {"fvu", "auxk"} and float(out.losses["auxk"]) > 0
    out.losses["auxk"].backward()
    enc_rows = sae.W_enc.grad.abs().sum(1)
    dec_rows = sae.W_dec.grad.abs().sum(1)
    assert (enc_rows[30:] == 0).all() and (dec_rows[30:] == 0).all()  # live latents untouched
    assert (enc_rows[:30] > 0).sum() >= 8 and (dec_rows[:30] > 0).sum() >= 8
    # No dead latents → no AuxK term at all.
    assert float(sae(x, dead_mask=torch.zeros(96, dtype=torch.bool)).losses["auxk"]) == 0
