"""Logit-mass lift by real intervention on a tiny Llama with a planted language feature.

The planted model: residual coordinates 56–63 are reserved (the embeddings, every attention
output and every MLP output write zeros there), so the residual stream only has a component
in them when we push one in. Six orthonormal feature directions live in that subspace; the LM
head maps the planted one (and an "anti" one) onto the target set V_es and a "decoy" onto V_en.
Pushing the planted direction at layer 1 therefore raises ΔM, pushing the decoy lowers it, and
the other directions do (almost) nothing.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from sae_train.models.sites import decoder_layers
from steering.language.token_sets import LanguageTokenSets
from steering.localise.lift import (FeatureRanking, direction_top_tokens, lift_cost,
                                    logit_mass_lift, median_token_norm,
                                    rank_by_selectivity_and_lift, rank_features, saturation_k,
                                    shares_prompt_pass, site_delta_edit,
                                    typical_norm_from_model)
from steering.localise.selectivity import feature_selectivity

SITE, LAYER = "layers.1.resid", 1
PLANTED, DECOY, ANTI = 2, 0, 4  # not index 0: "first" must not win by position
RESERVED = slice(56, 64)
PROMPTS = ["Hi.", "Name a fruit.", "Describe a quiet morning in a small town by the sea.",
           "Why do we sleep?", "What is rain?"]
ALPHAS = (0.25, 0.5, 1.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def planted(load_tiny):
    base, tokenizer, _ = load_tiny("llama")
    model = copy.deepcopy(base)  # the session's model is shared: never edit it in place
    vocab = len(tokenizer)
    ids = np.arange(vocab)
    sets = LanguageTokenSets.from_ids({"es": ids[ids % 7 == 0], "en": ids[ids % 7 == 1]}, vocab)
    g = torch.Generator().manual_seed(0)
    dictionary = torch.zeros(6, 64)
    dictionary[:, RESERVED] = torch.linalg.qr(torch.randn(8, 6, generator=g))[0].T
    final_scale = model.model.norm.weight.detach()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, RESERVED] = 0
        for layer in decoder_layers(model):
            layer.self_attn.o_proj.weight[RESERVED] = 0
            layer.mlp.down_proj.weight[RESERVED] = 0
        head = model.lm_head.weight
        # Account for the final RMSNorm's channel scale so the push maps exactly onto the rows.
        head[torch.from_numpy(sets.ids("es"))] += 1.5 * (dictionary[PLANTED]
                                                         + dictionary[ANTI]) / final_scale
        head[torch.from_numpy(sets.ids("en"))] += 1.5 * dictionary[DECOY] / final_scale
    scale = typical_norm_from_model(model, tokenizer, PROMPTS, SITE)
    return model, tokenizer, sets, dictionary, scale


def synthetic_codes(dictionary: torch.Tensor, n_pairs: int = 64):
    """Per-sentence activations of parallel pairs: the target side is shifted along the planted
    direction (+1), the decoy (+2: more selective than the planted one) and anti (−1)."""
    g = torch.Generator().manual_seed(1)
    x_en = 0.5 * torch.randn(n_pairs, 64, generator=g)
    x_t = (x_en + dictionary[PLANTED] + 2.0 * dictionary[DECOY] - dictionary[ANTI]
           + 0.3 * torch.randn(n_pairs, 64, generator=g))

    def encode(x):
        return torch.relu(x @ dictionary.T + 0.5)

    return encode(x_t), encode(x_en)


def test_typical_norm_is_the_median_token_norm(planted):
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])
    assert median_token_norm(x) == 5.0
    model, tokenizer, *_ , scale = planted
    assert 0.05 < scale < 5.0  # tiny random Llama: residual norms ≈ 0.2


def test_selectivity_and_lift_rank_the_planted_feature_first(planted):
    model, tokenizer, sets, dictionary, scale = planted
    z_t, z_en = synthetic_codes(dictionary)
    sel = feature_selectivity(z_t, z_en)
    assert sel.top(2).tolist() == [DECOY, PLANTED]  # selectivity alone is fooled by the decoy
    assert sel.sel[ANTI] < 0
    ranking, lift = rank_by_selectivity_and_lift(
        model, tokenizer, PROMPTS, sets, "es", SITE, sel.sel, dictionary, scale, top_m=6,
        alphas=ALPHAS, batch_size=16)
    assert isinstance(ranking, FeatureRanking)
    assert int(ranking.feature_ids[0]) == PLANTED
    assert ranking.k == 1 and ranking.selected.tolist() == [PLANTED]
    assert ANTI not in ranking.feature_ids.tolist()  # screened out: Sel < 0
    ids = lift.feature_ids.tolist()
    planted_slope = float(lift.slope[ids.index(PLANTED)])
    decoy_slope = float(lift.slope[ids.index(DECOY)])
    assert planted_slope > 1.0 and decoy_slope < -1.0
    row = lift.lift[ids.index(PLANTED)]
    assert (row[1:] > row[:-1]).all() and float(row[0]) > 0.3  # more push, more target mass
    others = [i for i in ids if i not in (PLANTED, DECOY)]
    assert all(abs(float(lift.slope[ids.index(i)])) < 0.05 for i in others)
    scores = dict(zip(ranking.feature_ids.tolist(), ranking.score.tolist()))
    assert scores[DECOY] == 0.0
    assert scores[PLANTED] > 100 * max(v for k, v in scores.items() if k != PLANTED)
    assert float(ranking.cumulative_gain[0]) > 0.99


def test_batched_lift_equals_one_feature_at_a_time_and_costs_what_it_says(planted):
    model, tokenizer, sets, dictionary, scale = planted
    calls = []
    counter = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        batched = logit_mass_lift(model, tokenizer, PROMPTS, sets, "es", SITE, dictionary,
                                  ALPHAS, scale, batch_size=7)
    finally:
        counter.remove()
    # 3 steps × (ceil(5/7) baseline + ceil(3·6·5/7) edited) generations
    assert batched.cost["generations"] == 1 + math.ceil(90 / 7) == 14
    assert len(calls) == batched.cost["forward_passes"] == 3 * 14
    singles = [logit_mass_lift(model, tokenizer, PROMPTS, sets, "es", SITE, dictionary[f:f + 1],
                               ALPHAS, scale, feature_ids=[f], batch_size=2,
                               baseline=batched.baseline)
               for f in range(len(dictionary))]
    torch.testing.assert_close(batched.lift, torch.cat([s.lift for s in singles]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.slope, torch.cat([s.slope for s in singles]),
                               atol=1e-5, rtol=0)
    assert float(batched.lift.abs().max()) > 0.5  # the comparison is not between zeros
    assert singles[0].cost["baseline_generations"] == 0  # a given baseline is reused
    # Lift is ΔM under the edit minus ΔM without it, prompt by prompt, then averaged.
    torch.testing.assert_close(batched.lift, batched.delta_m.mean(-1).T
                               - batched.baseline.mean(), atol=1e-6, rtol=0)
    shifted = logit_mass_lift(model, tokenizer, PROMPTS, sets, "es", SITE, dictionary[:1],
                              ALPHAS, scale, batch_size=16, baseline=batched.baseline + 0.25)
    torch.testing.assert_close(shifted.lift, singles[0].lift - 0.25, atol=1e-5, rtol=0)
    torch.testing.assert_close(shifted.slope, torch.quantile(shifted.lift / torch.tensor(ALPHAS),
                                                             0.5, dim=1))
    cost = lift_cost(n_prompts=40, n_features=64, n_alphas=3, batch_size=16, steps=3)
    assert cost == {"generations": 3 + 480, "baseline_generations": 3,
                    "edited_generations": 480, "forward_passes": 3 * 483, "rows": 7680}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_shared_prompt_pass_gives_the_lift_of_one_pass_per_row(planted, load_tiny, arch):
    """At a resid site the prompt pass runs each distinct prompt once below the edit and fans
    out into the rows above it (KV cache widened): every row's ΔM equals that of the plain
    per-row edit, at the first, a middle and the last layer (Gemma3: sliding-window layers
    with a window shorter than the longest prompt), in batches that split a prompt's rows."""
    if arch == "llama":
        model, tokenizer, sets, dictionary, scale = planted
        dirs, sites = dictionary, ["layers.0.resid", SITE, "layers.3.resid"]
    else:
        model, tokenizer, _ = load_tiny("gemma3")
        vocab = len(tokenizer)
        ids = np.arange(vocab)
        sets = LanguageTokenSets.from_ids({"es": ids[ids % 5 == 0], "en": ids[ids % 5 == 1]},
                                          vocab)
        width = model.config.hidden_size
        dirs = torch.randn(4, width, generator=torch.Generator().manual_seed(3))
        n = len(decoder_layers(model))
        sites = ["layers.0.resid", f"layers.{n // 2}.resid", f"layers.{n - 1}.resid"]
        scale = typical_norm_from_model(model, tokenizer, PROMPTS, sites[1])
    long_prompt = max(len(tokenizer(f"Question: {p}\nAnswer:")["input_ids"]) for p in PROMPTS)
    if arch == "gemma3":
        assert long_prompt > model.config.sliding_window
    for site in sites:
        assert shares_prompt_pass(model, site)
        kw = dict(alphas=ALPHAS, scale=scale * 4, batch_size=7)
        shared = logit_mass_lift(model, tokenizer, PROMPTS, sets, "es", site, dirs, **kw)
        plain = logit_mass_lift(model, tokenizer, PROMPTS, sets, "es", site, dirs,
                                share_prompt_pass=False, baseline=shared.baseline, **kw)
        torch.testing.assert_close(shared.delta_m, plain.delta_m, atol=1e-5, rtol=0)
        assert float((shared.delta_m - shared.baseline).abs().max()) > 1e-3  # edits matter
    assert not shares_prompt_pass(model, "layers.1.mlp")


def _hooks(model) -> set:
    """Every forward (pre-)hook on the model. transformers installs its own output-recording
    hooks the first time a model runs with output_hidden_states, so tests compare snapshots
    rather than expecting none at all."""
    return {(name, kind, key) for name, m in model.named_modules()
            for kind, hooks in (("fwd", m._forward_hooks), ("pre", m._forward_pre_hooks))
            for key in hooks}


def test_hooks_are_removed_even_on_error_and_the_model_is_unchanged(planted):
    model, tokenizer, sets, dictionary, scale = planted
    ids = tokenizer(["Question: Why do we sleep?\nAnswer:"], return_tensors="pt")["input_ids"]
    hooks_before = _hooks(model)
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    push = 2 * scale * dictionary[PLANTED]
    with pytest.raises(RuntimeError, match="boom"):
        with site_delta_edit(model, SITE, push):
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="per-row edit vectors"):
        with site_delta_edit(model, SITE, push.repeat(3, 1)), torch.no_grad():
            model(input_ids=ids)  # one row, three vectors: the hook itself raises
    too_big = LanguageTokenSets.from_ids({"es": [5, len(tokenizer) + 9], "en": [6]},
                                         len(tokenizer) + 10)
    with pytest.raises(ValueError, match="logits"):  # fails inside the edited generation
        logit_mass_lift(model, tokenizer, PROMPTS, too_big, "es", SITE, dictionary, ALPHAS,
                        scale, baseline=torch.zeros(len(PROMPTS)))
    assert _hooks(model) == hooks_before
    with torch.no_grad():
        after = model(input_ids=ids).logits
        with site_delta_edit(model, SITE, push):
            edited = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert (edited - before).abs().max() > 0.5  # the edit does act while inside


def test_edit_lands_on_the_block_output_for_tensor_and_tuple_outputs(planted):
    model, tokenizer, sets, dictionary, scale = planted
    layers = decoder_layers(model)
    ids = tokenizer(["Question: Hi.\nAnswer:", "Name a fruit."], return_tensors="pt",
                    padding=True)
    hooks_before = _hooks(model)
    seen = {}

    def grab_input(name):
        def hook(_m, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    handles = [layers[LAYER].register_forward_pre_hook(grab_input("in"), with_kwargs=True),
               layers[LAYER + 1].register_forward_pre_hook(grab_input("next"), with_kwargs=True)]
    vectors = torch.stack([dictionary[PLANTED], dictionary[DECOY]]) * scale  # one per row
    try:
        with torch.no_grad():
            model(**ids)
            plain = dict(seen)
            with site_delta_edit(model, SITE, vectors):
                model(**ids)
            tensor_path = dict(seen)
            # Decoder layers of older transformers return tuples: wrap before, unwrap after.
            wrap = layers[LAYER].register_forward_hook(lambda _m, _i, out: (out, None))
            with site_delta_edit(model, SITE, vectors):
                unwrap = layers[LAYER].register_forward_hook(lambda _m, _i, out: out[0])
                try:
                    model(**ids)
                finally:
                    unwrap.remove()
                    wrap.remove()
            tuple_path = dict(seen)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(tensor_path["in"], plain["in"])  # the block's input is not edited
    torch.testing.assert_close(tensor_path["next"], plain["next"] + vectors[:, None, :])
    torch.testing.assert_close(tuple_path["next"], tensor_path["next"])
    assert _hooks(model) == hooks_before


def test_top_tokens_of_the_planted_direction_are_target_tokens(planted):
    model, tokenizer, sets, dictionary, _ = planted
    tops = direction_top_tokens(model, tokenizer, dictionary[[PLANTED, DECOY]], k=10)
    es, en = set(sets.ids("es").tolist()), set(sets.ids("en").tolist())
    assert all(i in es for i, _, _ in tops[0]) and all(i in en for i, _, _ in tops[1])
    assert tops[0][0][1] == tokenizer.decode([tops[0][0][0]]) and tops[0][0][2] > 1.0


def test_ranking_rules_score_and_k_saturation():
    sel = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])
    slope = torch.tensor([1.0, 1.0, 1.0, 5.0, -1.0])
    ranking = rank_features([10, 11, 12, 13, 14], sel, slope, saturation=0.9)
    assert ranking.feature_ids.tolist() == [10, 11, 12, 14, 13]  # zero scores: by Sel
    torch.testing.assert_close(ranking.score, torch.tensor([2.0, 1.0, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(ranking.cumulative_gain[:3],
                               torch.tensor([2 / 3.5, 3 / 3.5, 1.0]))
    assert ranking.k == 3
    assert rank_features([10, 11, 12, 13, 14], sel, slope, saturation=0.8).k == 2
    assert rank_features([10, 11, 12, 13, 14], sel, slope, max_k=1).k == 1
    assert saturation_k(torch.tensor([5.0, 0.0, 0.0]), 0.9, min_k=2) == 1  # never a zero score
    assert saturation_k(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5) == 2
    nothing = rank_features([1, 2], torch.tensor([-1.0, 2.0]), torch.tensor([3.0, -1.0]))
    assert nothing.k == 0 and nothing.selected.numel() == 0 and nothing.warnings
    with pytest.raises(ValueError, match="descending"):
        saturation_k(torch.tensor([1.0, 2.0]))
