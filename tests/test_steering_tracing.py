"""Neuron tracing: planted MLP neurons of a tiny Llama are found, decoys are not."""

from __future__ import annotations

import copy

import pytest
import torch

from sae_train.models.sites import decoder_layers
from steering.localise.lape import lape_neurons
from steering.localise.tracing import (TailRule, feature_neuron_weights, lape_overlap,
                                       neuron_overlap, neuron_write_matrix, robust_z, tail_neurons,
                                       trace_mlp_features, trace_resid_features)

LAYER = 1
N1, N2 = 10, 77  # aligned with e*, more active on target text      → N_t
N3 = 40  # aligned with e*, more active on English                   → N_en
N4 = 99  # anti-aligned with e*, more active on target text          → N_en
DECOY_ORTHOGONAL = 5  # large target/English difference, writes orthogonally to e*
DECOY_ALIGNED = 6  # strongly aligned with e*, but no language difference


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def planted(load_tiny):
    base, _, _ = load_tiny("llama")
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    e_star = torch.randn(64, generator=g)
    e_star /= e_star.norm()
    down = decoder_layers(model)[LAYER].mlp.down_proj.weight  # (d_model, n_neurons)
    with torch.no_grad():
        down[:, N1] = 1.0 * e_star
        down[:, N2] = 0.8 * e_star
        down[:, N3] = 1.0 * e_star
        down[:, N4] = -1.0 * e_star
        col = down[:, DECOY_ORTHOGONAL]
        down[:, DECOY_ORTHOGONAL] = 3 * (col - (col @ e_star) * e_star) / col.norm()
        down[:, DECOY_ALIGNED] = 2.0 * e_star
    n_pairs, n_neurons = 200, down.shape[1]
    a_en = 1.0 + 0.5 * torch.randn(n_pairs, n_neurons, generator=g)
    a_t = a_en + 0.3 * torch.randn(n_pairs, n_neurons, generator=g)
    a_t[:, N1] += 2.0
    a_t[:, N2] += 2.0
    a_t[:, N3] -= 2.0
    a_t[:, N4] += 2.0
    a_t[:, DECOY_ORTHOGONAL] += 5.0
    return model, e_star, a_t, a_en


def test_tracing_returns_the_planted_neurons(planted):
    model, e_star, a_t, a_en = planted
    trace = trace_resid_features(model, LAYER, e_star[None], a_t, a_en,
                                 rule=TailRule(max_fraction=0.04), feature_ids=[123])
    assert trace.target_neurons.tolist() == [N1, N2]  # largest contribution first
    assert sorted(trace.english_neurons.tolist()) == sorted([N3, N4])
    # c = a·⟨W_down[:, n], e*⟩: mean differences 2·1, 2·0.8, −2·1, 2·(−1) (± sampling noise)
    torch.testing.assert_close(trace.score[[N1, N2, N3, N4]],
                               torch.tensor([2.0, 1.6, -2.0, -2.0]), atol=0.1, rtol=0)
    assert abs(float(trace.score[DECOY_ORTHOGONAL])) < 1e-5
    assert abs(float(trace.t[DECOY_ALIGNED])) < 3  # aligned, large z, but no real difference
    assert trace.to_dict()["target_neurons"] == [N1, N2]
    assert trace.feature_ids == [123] and trace.layer == LAYER


def test_several_features_are_weighted_and_mean_inputs_work(planted):
    model, e_star, a_t, a_en = planted
    other = torch.zeros(64)
    other[0] = 1.0
    w = feature_neuron_weights(torch.stack([e_star, other]), neuron_write_matrix(model, LAYER))
    assert w.shape == (2, 128)
    both = trace_resid_features(model, LAYER, torch.stack([e_star, -e_star]), a_t, a_en,
                                feature_weights=[1.0, 1.0])
    assert both.target_neurons.numel() == 0  # the two features cancel exactly
    flipped = trace_resid_features(model, LAYER, e_star[None], a_t.mean(0), a_en.mean(0),
                                   feature_weights=[-1.0], rule=TailRule(max_fraction=0.04))
    assert sorted(flipped.target_neurons[:2].tolist()) == sorted([N3, N4])
    # From means alone there is no paired-t filter: the aligned decoy's sampling difference
    # times its large weight passes the z threshold; with per-pair activations it does not.
    assert DECOY_ALIGNED in flipped.target_neurons.tolist() + flipped.english_neurons.tolist()
    assert flipped.t is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_write_matrix_columns_are_what_each_neuron_adds(load_tiny, arch):
    model, _, _ = load_tiny(arch)
    layer = decoder_layers(model)[2]
    down = layer.mlp.c_proj if arch == "gpt2" else layer.mlp.down_proj
    write = neuron_write_matrix(model, 2)
    n_neurons = write.shape[1]
    with torch.no_grad():
        zero = down(torch.zeros(1, n_neurons))
        for n in (0, 7, n_neurons - 1):
            onehot = torch.zeros(1, n_neurons)
            onehot[0, n] = 1.0
            torch.testing.assert_close(down(onehot)[0] - zero[0], write[:, n])


def test_gemma_post_norm_scale_is_folded(load_tiny):
    model, _, _ = load_tiny("gemma3")
    layer = decoder_layers(model)[1]
    raw = layer.mlp.down_proj.weight.detach()
    scale = 1.0 + layer.post_feedforward_layernorm.weight.detach()
    torch.testing.assert_close(neuron_write_matrix(model, 1), raw * scale[:, None])
    torch.testing.assert_close(neuron_write_matrix(model, 1, fold_post_norm=False), raw)


def test_mlp_sae_features_give_neurons_by_encoder_weights():
    g = torch.Generator().manual_seed(3)
    rows = 0.01 * torch.randn(2, 300, generator=g)
    rows[0, [12, 250]] = torch.tensor([1.0, 0.7])
    rows[1, 31] = 0.9
    rows[0, 44] = -1.2
    by_weights = trace_mlp_features(rows, rule=TailRule(max_fraction=0.02))
    assert by_weights.target_neurons.tolist() == [12, 31, 250]
    assert by_weights.english_neurons.tolist() == [44]
    a_en = torch.rand(50, 300, generator=g)
    a_t = a_en.clone()
    a_t[:, 31] += 1.0  # only neuron 31 differs between the languages
    a_t += 0.01 * torch.randn(50, 300, generator=g)
    contrast = trace_mlp_features(rows, a_t, a_en, rule=TailRule(max_fraction=0.02))
    assert contrast.target_neurons.tolist() == [31]


def test_tails_are_empty_for_noise_and_overlap_counts():
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2048, generator=g)
    z = robust_z(noise)
    assert abs(float(z.median())) < 1e-6 and 0.9 < float(z.std()) < 1.1
    pos, neg, _ = tail_neurons(noise)
    assert pos.numel() + neg.numel() <= 1  # z ≥ 4 on Gaussian noise: almost never
    spiked = noise.clone()
    spiked[[3, 9]] = torch.tensor([40.0, -35.0])
    pos, neg, _ = tail_neurons(spiked)
    assert 3 in pos.tolist() and 9 in neg.tolist()
    assert len(pos) <= TailRule().cap(2048) == 21

    ov = neuron_overlap([1, 2, 3], torch.tensor([2, 3, 4, 5]))
    assert (ov["intersection"], ov["union"], ov["jaccard"]) == (2, 5, 0.4)
    probs = torch.zeros(2, 8, 2)
    probs[0, 1, 0] = probs[0, 2, 0] = probs[1, 5, 0] = 0.9  # es-only neurons
    probs[0, 3, 1] = 0.9  # en-only
    probs += 0.01
    lape = lape_neurons(probs, ["es", "en"], layers=[4, 5], entropy_quantile=0.25,
                        prob_quantile=0.7)
    assert lape["es"][4].tolist() == [1, 2] and lape["es"][5].tolist() == [5]
    report = lape_overlap({4: torch.tensor([2, 7]), 6: [1]}, lape["es"])
    assert report["per_layer"][4]["intersection"] == 1
    assert report["per_layer"][6]["n_b"] == 0 and report["per_layer"][5]["n_a"] == 0
    assert report["total"] == {"n_traced": 3, "n_lape": 3, "intersection": 1, "union": 5,
                               "jaccard": 0.2}
