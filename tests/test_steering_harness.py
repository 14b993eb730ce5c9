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
from steering.evaluate.harness import (EvalSettings, evaluate_method, generate, sentence_scores,
                                       strength_grid, tune_strengths)
from steering.evaluate.judge import FluencyGuards
from steering.language.token_sets import LanguageTokenSets
from steering.steer.artifact import LayerEdit, SteeringArtifact

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
        from steering.steer.runtime import steer
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

    from steering.evaluate.pipeline import BARS, _check_bars
    from steering.evaluate.tuning import candidate_windows

    loc = SimpleNamespace(window=[15, 16, 17], layers=list(range(18)))
    cands = candidate_windows(loc, 3, 3)
    assert cands[0] == [15, 16, 17]  # the localised window first, not repeated
    assert cands[1:] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]]
    assert candidate_windows(loc, None, 3) == [[15, 16, 17]]
    loc = SimpleNamespace(window=[1, 2], layers=[0, 1, 2, 3])
    assert candidate_windows(loc, 2, 1) == [[1, 2], [0, 1], [2, 3]]
    from steering.steer.methods.caa import caa_candidate_layers

    loc = SimpleNamespace(layers=list(range(18)), best_causal_layer=lambda: 15)
    assert caa_candidate_layers(loc, None) == [15]
    assert caa_candidate_layers(loc, 4) == [0, 4, 8, 12, 15, 16]
    ok = {"default": {"mean": 0.96}, "nll_change_gen": {"mean": 0.01}}
    bars = _check_bars("es", ok, "foxp2")
    assert [b["met"] for b in bars] == [True, True] and len(bars) == len(BARS["es"])
    bad = {"default": {"mean": 0.95}, "nll_change_gen": {"mean": 0.2},
           "script_fraction": {"mean": 0.5}}
    assert [b["met"] for b in _check_bars("hi", bad, "foxp2")] == [True, False, False]
    # against the native row of the same run: DEFAULT ≥ native − margin, script ≥ native's
    native = {"default": {"mean": 0.77}, "script_fraction": {"mean": 0.4}}
    bars = _check_bars("hi", bad, "foxp2", native)
    assert [b["bound"] for b in bars] == [0.62, 0.10, 0.4]
    assert [b["met"] for b in bars] == [True, False, True]
    low = {**bad, "default": {"mean": 0.6}}
    assert not _check_bars("hi", low, "foxp2", native)[0]["met"]


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
    from steering.config import (LocaliseConfigError, SteerAppConfig, SteerEvalConfig,
                                 SteerTuningConfig)

    with pytest.raises(LocaliseConfigError, match="sustain"):
        SteerAppConfig(sustain=1.5)
    with pytest.raises(LocaliseConfigError, match="window_lams"):
        SteerTuningConfig(window_lams=[])
    with pytest.raises(LocaliseConfigError, match="tuning.objective"):
        SteerTuningConfig(objective="bleu")
    with pytest.raises(LocaliseConfigError, match="gen_batch_size"):
        SteerEvalConfig(gen_batch_size=0)
    with pytest.raises(LocaliseConfigError, match="caa_layer_stride"):
        SteerTuningConfig(caa_layer_stride=0)
    with pytest.raises(LocaliseConfigError, match="relevance_prompts"):
        SteerEvalConfig(relevance_prompts=1)
    for bad in ("lots", "-0.1"):
        with pytest.raises(LocaliseConfigError, match="tuning.nll_budget"):
            SteerTuningConfig(nll_budget=bad)
    assert SteerTuningConfig(nll_budget="bar").nll_budget == "bar"
    assert SteerTuningConfig(nll_budget="0.05").nll_budget == "0.05"
    assert SteerAppConfig(sustain=0.33).sustain == 0.33


def test_tuning_stops_a_line_at_its_first_point_over_the_budget(planted):
    model, tokenizer, sets, direction = planted
    settings = EvalSettings(max_new_tokens=4, batch_size=4)
    art = _artifact(direction)
    full_grid = dict(prompts=PROMPTS, sentences=SENTENCES, token_sets=sets,
                     lams=[2.0, 0.25, 1.0, 0.0], betas=[0.0], settings=settings)
    _, every, _ = tune_strengths(model, tokenizer, art, "lam", kl_budget=10.0,
                                 stop_over_budget=False, **full_grid)
    kls = {p.lam: p.kl for p in every}
    assert [p.lam for p in every] == [0.0, 0.25, 1.0, 2.0]  # ascending, whatever the order given
    assert kls[0.0] < kls[0.25] < kls[1.0] < kls[2.0]
    budget = (kls[0.25] + kls[1.0]) / 2  # λ = 1 is the first point over it
    tuned_full, _, _ = tune_strengths(model, tokenizer, art, "lam", kl_budget=budget,
                                      stop_over_budget=False, **full_grid)
    tuned, points, ok = tune_strengths(model, tokenizer, art, "lam", kl_budget=budget,
                                       **full_grid)
    assert ok and [p.lam for p in points] == [0.0, 0.25, 1.0]  # λ = 2 never measured
    assert tuned.lam == tuned_full.lam
    for p in points:  # the measured points are the full grid's
        assert p.kl == pytest.approx(kls[p.lam], rel=1e-5, abs=1e-7)
    # "both": each β line stops on its own
    grid = strength_grid("both", [1.0, 0.5], [1.0, 0.0])
    assert grid == [(0.5, 0.0), (1.0, 0.0), (0.5, 1.0), (1.0, 1.0)]


def test_held_out_text_reuses_the_base_and_matches_plain_sentences(planted):
    from steering.evaluate.harness import HeldOutText

    model, tokenizer, sets, direction = planted
    art = _artifact(direction)
    plain = sentence_scores(model, tokenizer, SENTENCES, art, batch_size=3)
    text = HeldOutText(model, tokenizer, SENTENCES, batch_size=3)
    kept = sentence_scores(model, tokenizer, text, art)
    assert all(b["base"] is not None for b in text.batches)
    again = sentence_scores(model, tokenizer, text, art.with_strengths(lam=0.5, beta=0.0,
                                                                       gamma=1.0))
    for mode in ("gen", "all"):
        np.testing.assert_allclose(kept.kl[mode], plain.kl[mode], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(kept.nll[mode], plain.nll[mode], rtol=1e-5, atol=1e-7)
        assert (again.kl[mode] < kept.kl[mode]).all()  # half the push: less KL, same base
    np.testing.assert_allclose(again.nll_base, plain.nll_base, rtol=1e-6)
    with pytest.raises(ValueError, match="another model"):
        sentence_scores(copy.deepcopy(model), tokenizer, text, art)


def test_sentence_scores_equal_the_plain_full_vocabulary_kl(planted):
    """The chunked KL / NLL of held-out text against the steered model's own logits."""
    from steering.language.defaultness import left_pad, pad_token_id
    from steering.steer.runtime import steer

    model, tokenizer, _sets, direction = planted
    art = _artifact(direction)
    got = sentence_scores(model, tokenizer, SENTENCES, art, modes=("all",), batch_size=2)
    ids, attn = left_pad(tokenizer(SENTENCES)["input_ids"], pad_token_id(tokenizer))
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        with steer(model, art, position="all"):
            steered = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    base, steered = (x[:, :-1].float().log_softmax(-1) for x in (base, steered))
    valid = (attn[:, 1:] * attn[:, :-1]).float()
    mean = lambda v: ((v * valid).sum(-1) / valid.sum(-1)).numpy()  # noqa: E731
    targets = ids[:, 1:, None]
    np.testing.assert_allclose(got.nll_base, mean(-base.gather(-1, targets)[..., 0]), atol=1e-5)
    np.testing.assert_allclose(got.nll["all"], mean(-steered.gather(-1, targets)[..., 0]),
                               atol=1e-5)
    want_kl = mean((steered.exp() * (steered - base)).sum(-1))
    assert want_kl.min() > 1e-3  # the steer moves the distributions
    np.testing.assert_allclose(got.kl["all"], want_kl, rtol=1e-4, atol=1e-6)


def test_continuation_nll_scores_only_the_kept_columns_correctly(planted):
    from steering.evaluate.harness import continuation_nll
    from steering.language.defaultness import DEFAULT_TEMPLATE

    model, tokenizer, sets, _ = planted
    settings = EvalSettings(max_new_tokens=7, batch_size=4)
    gens = generate(model, tokenizer, PROMPTS, None, sets, "es", settings=settings)
    conts = [ids[:3 + i % 4] for i, ids in enumerate(gens.new_ids)]  # ragged lengths
    skip = 2
    got = continuation_nll(model, tokenizer, PROMPTS, conts, skip, batch_size=4)
    assert len({len(c) for c in conts if len(c) > skip}) >= 2  # ragged rows were scored
    for p, cont, value in zip(PROMPTS, conts, got):
        if len(cont) <= skip:
            assert np.isnan(value)
            continue
        ids = tokenizer(DEFAULT_TEMPLATE.format(prompt=p))["input_ids"] + cont
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        cols = range(len(ids) - len(cont) + skip, len(ids))
        want = -float(np.mean([logp[c - 1, ids[c]].item() for c in cols]))
        assert value == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_positive_only_ablation_shares_the_primary_only_when_it_tuned_beta_zero():
    from types import SimpleNamespace

    from steering.evaluate.pipeline import _same_as_primary

    cfg = SimpleNamespace(primary="foxp2_neurons")
    beta0 = {"foxp2_neurons": {"strengths": {"lam": 4.0, "beta": 0.0}}}
    beta1 = {"foxp2_neurons": {"strengths": {"lam": 4.0, "beta": 1.0}}}
    assert _same_as_primary("foxp2_pos", cfg, beta0) is beta0["foxp2_neurons"]
    assert _same_as_primary("foxp2_pos", cfg, beta1) is None  # the primary pushes N_en too
    assert _same_as_primary("foxp2_neg", cfg, beta0) is None
    assert _same_as_primary("foxp2_pos", cfg, {}) is None  # primary not run (yet)
    # the primary is a baseline that foxp2_pos does not ablate
    assert _same_as_primary("foxp2_pos", SimpleNamespace(primary="caa_window"),
                            {"caa_window": {"strengths": {"lam": 1.0, "beta": 0.0}}}) is None


def _tuning_setup(sets, direction, lams, **extra):
    """Short generations without the NLL guard, the planted artifact, and tune_strengths'
    keywords for a λ line at β = 0 (KL budget wide open)."""
    settings = EvalSettings(max_new_tokens=8, batch_size=4,
                            guards=FluencyGuards(max_nll_increase=None))
    kw = dict(prompts=PROMPTS, sentences=SENTENCES, token_sets=sets, kl_budget=10.0,
              lams=lams, betas=[0.0], settings=settings, **extra)
    return settings, _artifact(direction), kw


def test_default_objective_ranks_by_guarded_default_within_the_budget(planted):
    from steering.evaluate.harness import guarded_default

    model, tokenizer, sets, direction = planted
    settings, art, kw = _tuning_setup(sets, direction, [0.0, 0.5, 1.0])
    tuned, points, ok = tune_strengths(model, tokenizer, art, "lam", objective="default", **kw)
    assert ok and all(p.default is not None and 0 <= p.default <= 1 for p in points)
    best = max(points, key=lambda p: (p.default, p.delta_m))
    assert tuned.lam == best.lam and "default" in best.to_dict()
    # each point's DEFAULT is the guarded rate of its own full-length generation
    for p in points:
        gens = generate(model, tokenizer, PROMPTS, art.with_strengths(lam=p.lam, beta=0.0,
                                                                      gamma=1.0),
                        sets, "es", settings=settings)
        from steering.evaluate.judge import identifiers_for
        assert p.default == pytest.approx(guarded_default(gens, "es", identifiers_for("es"),
                                                          settings.guards))
    _, plain, _ = tune_strengths(model, tokenizer, art, "lam", **kw)
    assert all(p.default is None and "default" not in p.to_dict() for p in plain)
    with pytest.raises(ValueError, match="objective"):
        tune_strengths(model, tokenizer, art, "lam", objective="bleu", **kw)


def test_default_failures_count_each_condition_a_continuation_misses():
    from steering.evaluate.harness import default_failures
    from steering.evaluate.judge import identifiers_for, judge_continuation

    ids = identifiers_for("es")
    guards = FluencyGuards()
    texts = ["El agua del mar es salada y la casa tiene un jardín grande.",  # passes
             "The water of the sea is salty and the house has a large garden.",  # English
             "de la de la de la de la de la de la de la de la",  # looping
             "La casa tiene un jardín grande y el agua del mar es salada."]  # ΔM ≤ 0 below
    judgements = [judge_continuation(t, t, "es", ids, guards) for t in texts]
    rates = default_failures(np.array([0.3, 0.2, 0.4, -0.1]), judgements, "es", guards)
    assert rates["delta_m"] == pytest.approx(0.25)  # the last one
    assert rates["language"] == pytest.approx(0.25)  # the English one (looping text is "es")
    assert rates["looping"] == pytest.approx(0.25)
    assert rates["script"] == rates["nll"] == rates["letters"] == 0
    # the only continuation that fails nothing is the only DEFAULT one
    default = [dm > 0 and j.is_target_head and j.fluent
               for dm, j in zip([0.3, 0.2, 0.4, -0.1], judgements)]
    assert default == [True, False, False, False]


def test_best_point_prefers_the_objective_within_the_budget_else_the_smallest_kl():
    from steering.evaluate.harness import TuningPoint, best_point

    a = TuningPoint(1.0, 0.0, delta_m=0.1, kl=0.2, within_budget=True, default=0.5)
    b = TuningPoint(2.0, 0.0, delta_m=0.3, kl=0.4, within_budget=True, default=0.2)
    c = TuningPoint(4.0, 0.0, delta_m=0.9, kl=0.9, within_budget=False, default=0.9)
    assert best_point([a, b, c]) == (b, True)
    assert best_point([a, b, c], "default") == (a, True)
    over = TuningPoint(8.0, 0.0, delta_m=1.0, kl=1.5, within_budget=False)
    assert best_point([over, c]) == (c, False)


def test_best_point_prefers_fluent_working_points_when_there_are_any():
    """tuning.nll_budget: within the KL budget, the points that also meet the NLL budget and
    work are preferred; none of them (or none working): every point within the KL budget."""
    from steering.evaluate.harness import TuningPoint, best_point

    def point(lam, default, fluent, kl=0.2, within=True):
        return TuningPoint(lam, 0.0, delta_m=default, kl=kl, within_budget=within,
                           default=default, nll_change=0.01 if fluent else 0.3, fluent=fluent)

    g05, g1, g15 = point(0.5, 0.0, True), point(1.0, 0.88, True), point(1.5, 1.0, False)
    assert best_point([g05, g1, g15], "default") == (g1, True)
    assert best_point([g05, point(1.0, 0.3, False), g15], "default") == (g15, True)
    over = point(2.0, 1.0, True, kl=0.9, within=False)  # fluent but over the KL budget
    assert best_point([g05, g15, over], "default") == (g15, True)
    assert g1.to_dict()["fluent"] is True and g1.to_dict()["nll_change"] == 0.01
    assert "fluent" not in TuningPoint(1.0, 0.0, 0.1, 0.2, True).to_dict()


def test_the_nll_budget_records_each_points_tuning_nll_change(planted):
    model, tokenizer, sets, direction = planted
    settings, art, kw = _tuning_setup(sets, direction, [0.5, 1.0], objective="default")
    _, points, _ = tune_strengths(model, tokenizer, art, "lam", nll_budget=0.05, **kw)
    for p in points:
        cand = art.with_strengths(lam=p.lam, beta=0.0, gamma=1.0)
        scores = sentence_scores(model, tokenizer, SENTENCES, cand, modes=("gen",),
                                 batch_size=4)
        assert p.nll_change == pytest.approx(float(np.nanmean(scores.nll["gen"]
                                                              - scores.nll_base)), abs=1e-6)
        assert p.fluent == (p.nll_change <= 0.05)
    _, plain, _ = tune_strengths(model, tokenizer, art, "lam", **kw)
    assert all(p.nll_change is None and p.fluent is None for p in plain)


def test_nll_guard_language_offset_raises_only_the_guards_allowance(planted):
    from steering.evaluate.harness import HeldOutText, language_nll_offset

    model, tokenizer, sets, direction = planted
    english = ["The water of the sea is salty.", "I like to read books at night.",
               "The house has a big garden.", "It is very hot in the city today."]
    offset = language_nll_offset(model, tokenizer, HeldOutText(model, tokenizer, SENTENCES),
                                 english)
    direct = [float(np.mean(sentence_scores(model, tokenizer, text, None, modes=()).nll_base))
              for text in (SENTENCES, english)]
    assert offset == pytest.approx(direct[0] - direct[1], abs=1e-6)

    # a guard that allows no NLL increase fails continuations; a large offset passes them
    settings = EvalSettings(max_new_tokens=8, batch_size=4, n_boot=50,
                            guards=FluencyGuards(max_nll_increase=0.0))
    art = _artifact(direction)
    base = generate(model, tokenizer, PROMPTS, None, sets, "es", settings=settings)
    from steering.evaluate.harness import continuation_nll, nll_guard_skip

    ref_nll = continuation_nll(model, tokenizer, PROMPTS, base.new_ids,
                               nll_guard_skip(art.decode_steps), settings.template, 4)
    kw = dict(target="es", english="en", prompts=PROMPTS, sentences=SENTENCES, token_sets=sets,
              settings=settings, reference=base, reference_nll=ref_nll)
    tight, _ = evaluate_method(model, tokenizer, art, **kw)
    loose, _ = evaluate_method(model, tokenizer, art, nll_offset=1e6, **kw)
    assert tight["default_failures"]["nll"] > 0 and loose["default_failures"]["nll"] == 0
    assert loose["nll_guard_offset"] == 1e6 and tight["nll_guard_offset"] == 0
    # the offset touches the guard only, not the reported continuation NLL increase
    assert loose["continuation_nll_increase"] == tight["continuation_nll_increase"]


def test_native_reference_templates_prompts_and_the_ceiling_line():
    from sae_train.corpora.embedded import load_embedded_prompts
    from steering.evaluate.config import SteerEvalConfig
    from steering.evaluate.native import NativeReferenceError, native_prompts, native_template
    from steering.evaluate.pipeline import _method_eval_key
    from steering.evaluate.report import _native_bar_lines, markdown

    assert native_template("es") == "Pregunta: {prompt}\nRespuesta:"
    assert native_template("hi").startswith("प्रश्न: {prompt}")
    assert native_template("fr") is None
    assert native_template("fr", "Question : {prompt}\nRéponse :").startswith("Question")
    with pytest.raises(NativeReferenceError, match="prompt"):
        native_template("es", "Pregunta sin hueco")
    with pytest.raises(ValueError, match="native_template"):
        SteerEvalConfig(native_template="no slot")

    # translated in the prompts' order; prompts without a translation are left out
    from sae_train.corpora.embedded import Prompt

    rows = load_embedded_prompts(["evaluation"])[:5]
    untranslated = [Prompt(f"user-{i}", f"A question of the user's {i}?", "evaluation", "")
                    for i in range(2)]
    texts, ids = native_prompts([rows[0], untranslated[0], *rows[1:], untranslated[1]], "es")
    assert ids == [p.id for p in rows] and len(texts) == 5
    assert all(t != p.text for t, p in zip(texts, rows))
    assert native_prompts(rows, "fr") == ([], [])
    # the native settings are not part of a method's stored-result key
    assert _method_eval_key(SteerEvalConfig(native_reference=False)) == \
        _method_eval_key(SteerEvalConfig(native_template="P: {prompt}\nR:"))

    def report(low, mean, high, bound):
        ci = {"mean": mean, "low": low, "high": high}
        metrics = {"default": ci, "n_prompts": 4, "default_failures": {}}
        return {"target": "es", "n_prompts": 4, "n_sentences": 4, "kl_budget": 0.5,
                "methods": {"native": {"metrics": metrics, "reference": "asked in es"}},
                "bars": [{"metric": "default", "bound": bound, "met": False, "text": "x"},
                         {"metric": "nll_change_gen", "bound": 0.05, "met": True, "text": "y"}]}

    assert "is above that ceiling" in _native_bar_lines(report(0.7, 0.8, 0.9, 0.95))[0]
    assert "within the CI of" in _native_bar_lines(report(0.7, 0.8, 0.9, 0.85))[0]
    assert "is below" in _native_bar_lines(report(0.7, 0.8, 0.9, 0.5))[0]
    assert len(_native_bar_lines(report(0.7, 0.8, 0.9, 0.95))) == 1  # DEFAULT bars only
    md = markdown(report(0.7, 0.8, 0.9, 0.95))
    assert "`native` is a reference, not a steer" in md and "DEFAULT 0.80 [0.70, 0.90]" in md


def test_repetition_penalty_setting_is_checked_and_keeps_stored_keys_at_one():
    import dataclasses

    from steering.evaluate.config import SteerEvalConfig
    from steering.evaluate.pipeline import _method_eval_key, _without_defaults

    with pytest.raises(ValueError, match="repetition_penalty"):
        SteerEvalConfig(repetition_penalty=0.0)
    # at 1 (plain greedy) the key is the one stored before the setting existed ...
    key = _method_eval_key(SteerEvalConfig())
    assert "repetition_penalty" not in key
    assert "repetition_penalty" not in _without_defaults(dataclasses.asdict(EvalSettings()))
    # ... and any other value changes it, so stored results are not reused
    assert _method_eval_key(SteerEvalConfig(repetition_penalty=1.3))["repetition_penalty"] == 1.3
    assert EvalSettings(repetition_penalty=1.3) != EvalSettings()


def test_the_harness_decodes_with_the_settings_repetition_penalty(planted):
    from steering.language.defaultness import left_pad

    model, tokenizer, sets, direction = planted
    penalised = EvalSettings(max_new_tokens=10, repetition_penalty=1.5)
    gens = generate(model, tokenizer, PROMPTS, None, sets, "es", settings=penalised)
    plain = generate(model, tokenizer, PROMPTS, None, sets, "es",
                     settings=EvalSettings(max_new_tokens=10))
    assert gens.new_ids != plain.new_ids
    pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    ids, attn = left_pad([tokenizer(penalised.template.format(prompt=p))["input_ids"]
                          for p in PROMPTS], pad)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=10,
                             min_new_tokens=10, do_sample=False, repetition_penalty=1.5,
                             pad_token_id=pad)[:, ids.shape[1]:]
    eos = tokenizer.eos_token_id
    for row, expected in zip(gens.new_ids, ref.tolist()):
        cut = next((i for i, t in enumerate(expected) if t == eos), len(expected))
        assert row == expected[:cut]


def test_default_objective_applies_the_relevance_guard(planted):
    """With a relevance check the tuning DEFAULT is the guarded rate times the guard's verdict
    (PMI ≥ τ) of the same generations: τ = −∞ changes nothing, τ = +∞ zeroes every point."""
    from steering.evaluate.harness import guarded_default
    from steering.evaluate.judge import identifiers_for
    from steering.evaluate.relevance import RelevanceCheck, RelevanceSettings, relevance_pmi

    model, tokenizer, sets, direction = planted
    settings, art, kw = _tuning_setup(sets, direction, [0.0, 1.0], objective="default")
    check = lambda tau: RelevanceCheck(tau, settings.template,  # noqa: E731
                                       RelevanceSettings(n_others=2, max_tokens=8))
    _, plain, _ = tune_strengths(model, tokenizer, art, "lam", **kw)
    _, open_guard, _ = tune_strengths(model, tokenizer, art, "lam",
                                      relevance=check(float("-inf")), **kw)
    assert [p.default for p in open_guard] == [p.default for p in plain]
    _, shut, _ = tune_strengths(model, tokenizer, art, "lam", relevance=check(float("inf")),
                                **kw)
    assert all(p.default == 0 for p in shut)
    # an intermediate τ: the verdicts of relevance_pmi on the same generations
    cand = art.with_strengths(lam=1.0, beta=0.0, gamma=1.0)
    gens = generate(model, tokenizer, PROMPTS, cand, sets, "es", settings=settings)
    pmi = relevance_pmi(model, tokenizer, PROMPTS, gens.new_ids, settings.template,
                        RelevanceSettings(n_others=2, max_tokens=8), settings.batch_size)
    tau = float(np.nanmedian(pmi))
    _, mid, _ = tune_strengths(model, tokenizer, art, "lam", relevance=check(tau), **kw)
    expected = guarded_default(gens, "es", identifiers_for("es"), settings.guards,
                               np.array([float(v >= tau) for v in pmi]))
    assert mid[-1].default == pytest.approx(expected)
