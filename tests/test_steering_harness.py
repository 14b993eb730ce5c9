"""The evaluation harness on a tiny Llama with a planted "language" direction.

The planted model (as in test_steering_lift): residual coordinates 56–63 are reserved; the LM
head maps the planted direction onto V_es. A steer that pushes the planted direction must
switch the model's greedy output onto V_es tokens (ΔM from negative to strongly positive),
tuning must pick a non-zero strength within the KL budget, and a random-direction push of
the same norm and the prompting baseline go through the very same harness without doing so.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sae_train.models.sites import decoder_layers
from steering.artifact import LayerEdit, SteeringArtifact
from steering.evaluate import (EvalSettings, evaluate_method, generate, sentence_scores,
                               strength_grid, tune_strengths)
from steering.judge import FluencyGuards
from steering.token_sets import LanguageTokenSets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RESERVED = slice(56, 64)
PROMPTS = ["Hi.", "Name a fruit.", "Why do we sleep?", "What is rain?", "Tell me a story.",
           "Where is the sea?"]
SENTENCES = ["El agua del mar es salada.", "Me gusta leer libros por la noche.",
             "La casa tiene un jardín grande.", "Hoy hace mucho calor en la ciudad."]


@pytest.fixture(scope="module")
def planted(load_tiny):
    base, tokenizer, _ = load_tiny("llama")
    model = copy.deepcopy(base)
    vocab = len(tokenizer)
    ids = np.arange(vocab)
    sets = LanguageTokenSets.from_ids({"es": ids[ids % 7 == 0], "en": ids[ids % 7 == 1]}, vocab)
    direction = torch.zeros(64)
    direction[RESERVED] = torch.linalg.qr(torch.randn(8, 1, generator=torch.Generator()
                                                      .manual_seed(0)))[0][:, 0]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, RESERVED] = 0
        for layer in decoder_layers(model):
            layer.self_attn.o_proj.weight[RESERVED] = 0
            layer.mlp.down_proj.weight[RESERVED] = 0
        model.lm_head.weight[torch.from_numpy(sets.ids("es"))] += \
            2.0 * direction / model.model.norm.weight.detach()
    return model, tokenizer, sets, direction


def _artifact(direction, method="planted") -> SteeringArtifact:
    # The push is in the layer's units: the tiny model's residual norm is O(1).
    return SteeringArtifact(method=method, target="es", lam=1.0, beta=0.0,
                            edits=[LayerEdit(layer=1, space="resid", add=direction * 4.0)],
                            decode_steps=3)


def test_planted_steer_switches_language_and_baselines_do_not(planted):
    model, tokenizer, sets, direction = planted
    settings = EvalSettings(max_new_tokens=8, batch_size=4, n_boot=200,
                            guards=FluencyGuards(max_nll_increase=None))
    base = generate(model, tokenizer, PROMPTS, None, sets, "es", settings=settings)
    art = _artifact(direction)
    steered = generate(model, tokenizer, PROMPTS, art, sets, "es", settings=settings)
    assert base.delta_m.mean() < 0.05
    assert steered.delta_m.mean() > base.delta_m.mean() + 0.3
    es = set(sets.ids("es").tolist())
    # the steered tokens (prompt end + 3 decode steps → the first 4 new tokens) are V_es
    first = [ids[:4] for ids in steered.new_ids]
    assert np.mean([t in es for row in first for t in row]) > 0.9
    assert np.mean([t in es for row in base.new_ids for t in row[:4]]) < 0.5

    g = torch.Generator().manual_seed(3)
    noise = torch.randn(64, generator=g)
    noise[RESERVED] = 0
    noise = noise / noise.norm() * direction.norm()
    rand = generate(model, tokenizer, PROMPTS, _artifact(noise, "random"), sets, "es",
                    settings=settings)
    assert rand.delta_m.mean() < steered.delta_m.mean() - 0.3
    prompting = SteeringArtifact(method="prompting", target="es", edits=[],
                                 prompt_prefix="Answer in Spanish. ")
    metrics, _ = evaluate_method(model, tokenizer, prompting, target="es", english="en",
                                 prompts=PROMPTS, sentences=SENTENCES, token_sets=sets,
                                 settings=settings, reference=base)
    assert metrics["kl_gen"]["mean"] == pytest.approx(0, abs=1e-6)  # no edit: same model
    assert metrics["delta_m"]["mean"] < steered.delta_m.mean() - 0.3


def test_metrics_of_the_planted_steer_are_consistent(planted):
    model, tokenizer, sets, direction = planted
    settings = EvalSettings(max_new_tokens=8, batch_size=4, n_boot=200)
    art = _artifact(direction)
    metrics, gens = evaluate_method(model, tokenizer, art, target="es", english="en",
                                    prompts=PROMPTS, sentences=SENTENCES, token_sets=sets,
                                    settings=settings)
    for key in ("default", "lid_head", "lid_full", "leak", "looping"):
        m = metrics[key]
        assert 0 <= m["low"] <= m["mean"] <= m["high"] <= 1, key
    assert metrics["delta_m"]["mean"] == pytest.approx(float(gens.delta_m.mean()), abs=1e-6)
    # KL ≥ 0 and steering every position costs at least as much as steering the prompt end
    assert metrics["kl_gen"]["mean"] >= 0
    assert metrics["kl_all"]["mean"] >= metrics["kl_gen"]["mean"] - 1e-6
    # the harness's KL equals a direct computation on one sentence
    ids = tokenizer(SENTENCES[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lp_base = model(ids).logits.float().log_softmax(-1)[0, :-1]
        from steering.runtime import steer
        with steer(model, art, position="all"):
            lp = model(ids).logits.float().log_softmax(-1)[0, :-1]
    kl = float((lp.exp() * (lp - lp_base)).sum(-1).mean())
    one = sentence_scores(model, tokenizer, SENTENCES[:1], art, modes=("all",))
    assert one.kl["all"][0] == pytest.approx(kl, rel=1e-4, abs=1e-6)


def test_tuning_picks_a_strength_within_the_budget(planted):
    model, tokenizer, sets, direction = planted
    settings = EvalSettings(max_new_tokens=4, batch_size=4)
    art = _artifact(direction)
    tuned, points, ok = tune_strengths(model, tokenizer, art, "lam", prompts=PROMPTS,
                                       sentences=SENTENCES, token_sets=sets, kl_budget=10.0,
                                       lams=[0.0, 0.25, 1.0], betas=[0.0],
                                       settings=settings)
    assert ok and [p.lam for p in points] == [0.0, 0.25, 1.0]
    assert tuned.lam == max(points, key=lambda p: p.delta_m).lam
    assert tuned.lam > 0
    # a budget nothing meets: the smallest-KL point (λ = 0) and the flag
    tuned, points, ok = tune_strengths(model, tokenizer, art, "lam", prompts=PROMPTS,
                                       sentences=SENTENCES, token_sets=sets, kl_budget=1e-12,
                                       lams=[0.25, 1.0], betas=[0.0], settings=settings)
    assert not ok and tuned.lam == min(points, key=lambda p: p.kl).lam
    assert strength_grid("beta", [1.0], [0.0, 2.0]) == [(0.0, 2.0)]
    assert len(strength_grid("both", [1, 2], [0, 1])) == 4


def test_candidate_windows_and_bars():
    from types import SimpleNamespace

    from steering.pipeline import BARS, _check_bars, candidate_windows

    loc = SimpleNamespace(window=[15, 16, 17], layers=list(range(18)))
    cands = candidate_windows(loc, 3, 3)
    assert cands[0] == [15, 16, 17]  # the localised window first, not repeated
    assert cands[1:] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]]
    assert candidate_windows(loc, None, 3) == [[15, 16, 17]]
    loc = SimpleNamespace(window=[1, 2], layers=[0, 1, 2, 3])
    assert candidate_windows(loc, 2, 1) == [[1, 2], [0, 1], [2, 3]]
    ok = {"default": {"mean": 0.96}, "nll_change_gen": {"mean": 0.01}}
    bars = _check_bars("es", ok, "foxp2")
    assert [b["met"] for b in bars] == [True, True] and len(bars) == len(BARS["es"])
    bad = {"default": {"mean": 0.95}, "nll_change_gen": {"mean": 0.2},
           "script_fraction": {"mean": 0.5}}
    assert [b["met"] for b in _check_bars("hi", bad, "foxp2")] == [True, False, False]


def test_gen_mode_follows_the_artifacts_position(planted):
    """An all-positions steer is scored at all positions in `gen` mode too (as generated)."""
    model, tokenizer, _, direction = planted
    art = _artifact(direction)
    everywhere = art.with_strengths(position="all")
    a = sentence_scores(model, tokenizer, SENTENCES, art, modes=("gen", "all"))
    b = sentence_scores(model, tokenizer, SENTENCES, everywhere, modes=("gen", "all"))
    np.testing.assert_allclose(b.kl["gen"], b.kl["all"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a.kl["all"], b.kl["all"], rtol=1e-5, atol=1e-7)
    assert (a.kl["gen"] <= a.kl["all"] + 1e-6).all()


def test_steer_settings_are_checked_at_start():
    from steering.config import LocaliseConfigError, SteerAppConfig, SteerTuningConfig

    with pytest.raises(LocaliseConfigError, match="sustain"):
        SteerAppConfig(sustain=1.5)
    with pytest.raises(LocaliseConfigError, match="window_lams"):
        SteerTuningConfig(window_lams=[])
    assert SteerAppConfig(sustain=0.33).sustain == 0.33
