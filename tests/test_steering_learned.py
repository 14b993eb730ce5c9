"""Learned sparse steers (steering.learned) on the tiny random Llama and Gemma3.

A random tiny model's neurons barely move its (near-uniform) outputs, so a "language neuron"
is planted, as in test_steering_harness: residual coordinates 56–63 are reserved (no
embedding, attention or MLP writes there) except for four MLP neurons of layer 1, whose down
projection writes a direction that the LM head maps onto the target token set V_es (the
tokens of the Spanish "native answers"). The learned shift, on every neuron of layers 0–1,
must lower the teacher-forced NLL of those answers after English prompts, raise the target
mass of the greedy output on *held-out* prompts far more than the untrained steer, find the
planted neurons when the L1 term switches the others off, and reload from disk as an
ordinary artifact that steers identically with and without the KV cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_train.corpora.embedded import load_embedded_corpus
from sae_train.models.sites import decoder_layers
from steering.steer.artifact import SteeringArtifact
from steering.language.defaultness import DEFAULT_TEMPLATE, greedy_language_masses, left_pad
from steering.steer.learned import (HeldOutKL, LearnConfig, LearnedSteerError, NeuronShift,
                                     Support, TeacherExample, answer_nll, learn_steer,
                                     position_weights)
from steering.steer.runtime import steer
from steering.language.token_sets import LanguageTokenSets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN_PROMPTS = ["Explain how rain forms.", "Why is the sky blue?", "Name three fruits.",
                 "What is a river?", "Describe a cat.", "How do birds fly?",
                 "What is bread made of?", "Why do we sleep?"]
HELD_OUT_PROMPTS = ["Tell me about the sea.", "What is a mountain?", "How does a clock work?",
                    "Describe your town."]
LAYERS = (0, 1)
RESERVED = slice(56, 64)
PLANTED = [3, 11, 17, 29]  # layer 1's planted language neurons


def _planted(base, tokenizer, target_ids):
    import copy

    model = copy.deepcopy(base)
    width = model.config.hidden_size
    direction = torch.zeros(width)
    direction[RESERVED] = torch.linalg.qr(torch.randn(8, 1, generator=torch.Generator()
                                                      .manual_seed(0)))[0][:, 0]
    body = model.get_decoder()
    with torch.no_grad():
        body.embed_tokens.weight[:, RESERVED] = 0
        for layer in decoder_layers(model):
            layer.self_attn.o_proj.weight[RESERVED] = 0
            layer.mlp.down_proj.weight[RESERVED] = 0
        decoder_layers(model)[1].mlp.down_proj.weight[:, PLANTED] = \
            direction[:, None] * 0.5
        norm = body.norm.weight.detach()
        norm = norm + 1 if "gemma" in type(model).__name__.lower() else norm
        model.get_output_embeddings().weight[torch.tensor(target_ids)] += 2.0 * direction / norm
    return model


def _spanish(n: int) -> list[str]:
    docs = load_embedded_corpus(["es"], ["discovery"]).to_documents()
    return [d.text for d in docs if d.language == "es"][:n]


def _setup(base, tokenizer, teacher_len: int = 8):
    spanish = _spanish(len(TRAIN_PROMPTS) + 12)
    teacher = []
    for i, p in enumerate(TRAIN_PROMPTS):
        prompt_ids = tokenizer(DEFAULT_TEMPLATE.format(prompt=p))["input_ids"]
        answer = tokenizer(" " + spanish[i], add_special_tokens=False)["input_ids"]
        teacher.append(TeacherExample(f"p{i}", list(prompt_ids), list(answer[:teacher_len])))
    # the "target" token set: every token of the Spanish teacher text; English: the rest
    vocab = len(tokenizer)
    target_ids = sorted({t for ex in teacher for t in ex.answer_ids})
    others = np.setdiff1d(np.arange(vocab), target_ids)
    model = _planted(base, tokenizer, target_ids)
    sets = LanguageTokenSets.from_ids({"es": np.array(target_ids), "en": others}, vocab)
    width = model.config.intermediate_size
    support = Support(list(LAYERS), {l: torch.arange(width) for l in LAYERS},
                      {l: torch.ones(width) for l in LAYERS})
    held = HeldOutKL(model, [tokenizer(s)["input_ids"] for s in spanish[len(TRAIN_PROMPTS):]],
                     pad_id=tokenizer.pad_token_id or 0)
    return model, teacher, sets, support, held


def _target_mass(model, tokenizer, artifact, sets, prompts, steps=4) -> float:
    texts = [DEFAULT_TEMPLATE.format(prompt=p) for p in prompts]
    ids, attn = left_pad(tokenizer(texts)["input_ids"], tokenizer.pad_token_id or 0)
    set_ids = [sets.id_tensor("es", "cpu"), sets.id_tensor("en", "cpu")]
    if artifact is None:
        masses, _ = greedy_language_masses(model, ids, attn, set_ids, steps)
    else:
        with steer(model, artifact):
            masses, _ = greedy_language_masses(model, ids, attn, set_ids, steps)
    return float(masses[0].mean())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_learned_steer_learns_and_switches_held_out_prompts(load_tiny, arch, tmp_path):
    model, tokenizer, _ = load_tiny(arch)
    model, teacher, sets, support, held = _setup(model, tokenizer)
    cfg = LearnConfig(steps=60, lr=0.1, batch_size=8, kl_weight=0.0, l1_weight=0.0,
                      progress=False)
    before = float(answer_nll(model, None, teacher, cfg, "prompt_end", 4, 1.0, 0))
    flags = [p.requires_grad for p in model.parameters()]
    result = learn_steer(model, support, teacher, held, cfg, target="es", english="en",
                         method="foxp2_learned", decode_steps=4, sustain=1.0)
    after = np.mean([h["nll"] for h in result.history[-5:]])
    assert after < before - 0.5, (before, after)
    # the model's own requires_grad flags are restored
    assert [p.requires_grad for p in model.parameters()] == flags
    base = _target_mass(model, tokenizer, None, sets, HELD_OUT_PROMPTS)
    learned = _target_mass(model, tokenizer, result.artifact, sets, HELD_OUT_PROMPTS)
    assert learned > base + 0.25, (base, learned)
    # and it reloads from disk as an ordinary artifact that steers the same
    result.artifact.save(tmp_path / "art")
    loaded = SteeringArtifact.load(tmp_path / "art")
    assert _target_mass(model, tokenizer, loaded, sets, HELD_OUT_PROMPTS) == \
        pytest.approx(learned, abs=1e-5)


def test_learned_artifact_same_with_and_without_kv_cache(load_tiny):
    model, tokenizer, _ = load_tiny("llama")
    model, teacher, sets, support, held = _setup(model, tokenizer)
    cfg = LearnConfig(steps=15, lr=0.1, kl_weight=0.5, l1_weight=0.0, progress=False)
    art = learn_steer(model, support, teacher, held, cfg, target="es", english="en",
                      method="foxp2_learned", decode_steps=2, sustain=0.5).artifact
    batch = tokenizer([DEFAULT_TEMPLATE.format(prompt=p) for p in HELD_OUT_PROMPTS],
                      return_tensors="pt", padding=True)
    outs = []
    for use_cache in (True, False):
        with steer(model, art):
            outs.append(model.generate(**batch, max_new_tokens=8, do_sample=False,
                                       use_cache=use_cache,
                                       pad_token_id=tokenizer.pad_token_id))
    assert torch.equal(outs[0], outs[1])


def test_l1_penalty_zeroes_neurons(load_tiny):
    model, tokenizer, _ = load_tiny("llama")
    model, teacher, _, support, held = _setup(model, tokenizer)
    common = dict(steps=30, lr=0.1, kl_weight=0.0, progress=False)
    dense = learn_steer(model, support, teacher, held, LearnConfig(l1_weight=0.0, **common),
                        target="es", english="en", method="m")
    sparse = learn_steer(model, support, teacher, held, LearnConfig(l1_weight=0.1, **common),
                         target="es", english="en", method="m")
    assert dense.n_nonzero > 0.9 * support.size
    assert sparse.n_nonzero < 0.5 * support.size
    # what survives is the planted language neurons
    layer1 = next(e for e in sparse.artifact.edits if e.layer == 1)
    assert set(PLANTED) <= set(layer1.add_index.tolist())
    kept = sum(int(e.add_index.numel()) for e in sparse.artifact.edits)
    assert kept == sparse.n_nonzero


def test_kl_term_keeps_target_text_closer(load_tiny):
    model, tokenizer, _ = load_tiny("llama")
    model, teacher, _, support, held = _setup(model, tokenizer)
    common = dict(steps=30, lr=0.1, l1_weight=0.0, progress=False, seed=1)
    loose = learn_steer(model, support, teacher, held, LearnConfig(kl_weight=0.0, **common),
                        target="es", english="en", method="m", sustain=1.0)
    tight = learn_steer(model, support, teacher, held, LearnConfig(kl_weight=5.0, **common),
                        target="es", english="en", method="m", sustain=1.0)
    from steering.steer.learned import NeuronShift

    def kl_of(art):
        shift = NeuronShift(support)
        with torch.no_grad():
            for e in art.edits:
                full = torch.zeros(support.index[e.layer].numel())
                full[e.add_index] = e.add
                shift.theta[str(e.layer)].copy_(full)
        with torch.no_grad():
            return float(held(shift, list(range(len(held))), "prompt_end", 4, 1.0))
    assert kl_of(tight.artifact) < kl_of(loose.artifact)


def test_position_weights_follow_the_runtime():
    w = position_weights(torch.tensor([2, 0]), 8, "prompt_end", 2, 0.25)
    assert w[0].tolist() == [0, 0, 1, 1, 1, 0.25, 0.25, 0.25]
    assert w[1].tolist() == [1, 1, 1, 0.25, 0.25, 0.25, 0.25, 0.25]
    assert position_weights(torch.tensor([3]), 4, "all", 2, 0.0).tolist() == [[1, 1, 1, 1]]


@pytest.mark.parametrize("bad", [dict(steps=0), dict(lr=-1.0), dict(init="ones"),
                                 dict(kl_weight=float("nan")), dict(relevance_weight=-1.0),
                                 dict(relevance_margin=float("inf"))])
def test_bad_learn_config_is_a_clear_error(bad):
    with pytest.raises(LearnedSteerError, match=next(iter(bad))):
        LearnConfig(**bad)


@pytest.mark.parametrize("affine", [False, True])
def test_artifact_applies_exactly_what_was_trained(load_tiny, affine, tmp_path):
    """The runtime applying the saved artifact gives the training hook's logits."""
    from steering.steer.learned import NeuronShift, shifted, to_artifact

    model, tokenizer, _ = load_tiny("gemma3")
    width = model.config.intermediate_size
    g = torch.Generator().manual_seed(3)
    support = Support([0, 1], {l: torch.randperm(width, generator=g)[:40] for l in (0, 1)},
                      {l: torch.rand(40, generator=g) + 0.5 for l in (0, 1)})
    shift = NeuronShift(support, affine=affine)
    with torch.no_grad():
        for p in shift.parameters_by_group():
            p.copy_(torch.randn(p.shape, generator=g))
        shift.theta["1"][:10] = 0  # some neurons off
    batch = tokenizer([DEFAULT_TEMPLATE.format(prompt=p) for p in HELD_OUT_PROMPTS],
                      return_tensors="pt", padding=True)
    with torch.no_grad(), shifted(model, shift, torch.ones(batch["input_ids"].shape)):
        trained = model(**batch).logits
    art = to_artifact(shift, target="es", english="en", method="m", position="all",
                      decode_steps=0, sustain=0.0, provenance={})
    art.save(tmp_path / "a")
    with torch.no_grad(), steer(model, SteeringArtifact.load(tmp_path / "a")):
        applied = model(**batch).logits
    assert torch.allclose(trained, applied, atol=1e-4)
    with torch.no_grad():
        plain = model(**batch).logits
    assert not torch.allclose(plain, applied, atol=1e-3)


def test_lineas_matches_target_distribution_and_sparsifies(load_tiny):
    from steering.steer.lineas import LineasConfig, learn_lineas
    from steering.steer.supports import neuron_scales

    base, tokenizer, _ = load_tiny("llama")
    spanish = _spanish(40)
    english = [d.text for d in load_embedded_corpus(["en"], ["discovery"]).to_documents()
               if d.language == "en"][:40]
    scales = neuron_scales(base, tokenizer, spanish + english, list(LAYERS))
    width = base.config.intermediate_size
    support = Support(list(LAYERS), {l: torch.arange(width) for l in LAYERS}, scales)
    en_ids = [tokenizer(t)["input_ids"] for t in english]
    es_ids = [tokenizer(t)["input_ids"] for t in spanish]
    dense = learn_lineas(base, support, en_ids, es_ids,
                         LineasConfig(steps=40, lr=0.05, l1_weight=0.0, progress=False),
                         target_lang="es")
    first, last = dense.history[0]["sw"], np.mean([h["sw"] for h in dense.history[-5:]])
    assert last < 0.85 * first, (first, last)
    assert any(e.has_gain for e in dense.artifact.edits)
    sparse = learn_lineas(base, support, en_ids, es_ids,
                          LineasConfig(steps=40, lr=0.05, l1_weight=0.003, progress=False),
                          target_lang="es")
    assert sparse.n_nonzero < 0.25 * support.size < dense.n_nonzero


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_restricted_kl_matches_exact_kl_on_the_full_vocabulary_and_bounds_it(load_tiny, arch):
    """HeldOutKL(top_k=V) restricts to every token: the same KL as the exact one; a small
    top_k gives a KL on fewer rows, still ≥ 0 and of the same order, with no base forward."""
    model, tokenizer, _ = load_tiny(arch)
    model, teacher, sets, support, _ = _setup(model, tokenizer)
    rows = [tokenizer(s)["input_ids"] for s in _spanish(len(TRAIN_PROMPTS) + 12)[-12:]]
    steer_ = NeuronShift(support)
    with torch.no_grad():
        for p in steer_.theta.values():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    pick, pad = list(range(6)), tokenizer.pad_token_id or 0
    exact = HeldOutKL(model, rows, pad_id=pad)
    full = HeldOutKL(model, rows, pad_id=pad, top_k=len(tokenizer) + 10)
    small = HeldOutKL(model, rows, pad_id=pad, top_k=4)
    with torch.no_grad():
        k_exact = float(exact(steer_, pick, "prompt_end", 2, 0.5))
        k_full = float(full(steer_, pick, "prompt_end", 2, 0.5))
        k_small = float(small(steer_, pick, "prompt_end", 2, 0.5))
    assert full.vocab.numel() == model.get_output_embeddings().weight.shape[0]
    assert k_full == pytest.approx(k_exact, rel=1e-4, abs=1e-6)
    assert k_exact > 1e-3 and 0 <= k_small and small.vocab.numel() < full.vocab.numel()
    with pytest.raises(LearnedSteerError, match="top_k"):
        HeldOutKL(model, rows, pad_id=pad, top_k=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_relevance_hinge_matches_plain_forwards(load_tiny, arch):
    """The relevance term equals max(0, m − PMI) with PMI computed from plain forwards of the
    unsteered model: each answer's mean NLL after the next example's prompt minus after its
    own; under a steer its gradient reaches θ."""
    from steering.steer.learned import relevance_hinge, token_nll

    model, tokenizer, _ = load_tiny(arch)
    model, teacher, sets, support, held = _setup(model, tokenizer)
    batch = teacher[:4]
    cfg = LearnConfig(relevance_margin=0.3, progress=False)

    def mean_nll(prompt, answer):
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = model(ids).logits[0].float().log_softmax(-1)
        start = len(prompt) - 1
        return -float(np.mean([logp[start + j, a] for j, a in enumerate(answer)]))

    pmi = [mean_nll(batch[(i + 1) % 4].prompt_ids, ex.answer_ids)
           - mean_nll(ex.prompt_ids, ex.answer_ids) for i, ex in enumerate(batch)]
    expected = float(np.mean([max(0.0, 0.3 - v) for v in pmi]))
    with torch.no_grad():
        own, row, _ = token_nll(model, None, batch, cfg, "prompt_end", 4, 1.0, 0)
        got = float(relevance_hinge(model, None, batch, cfg, own, row, "prompt_end", 4, 1.0, 0))
    assert got == pytest.approx(expected, abs=1e-4)

    # under a steer the term is differentiable in θ (it reaches the optimiser)
    shift = NeuronShift(support)
    for p in shift.parameters():
        torch.nn.init.normal_(p, std=0.5)
    weights = dict(position="prompt_end", decode_steps=4, sustain=1.0, pad_id=0)
    own, row, _ = token_nll(model, shift, batch, cfg, **weights)
    relevance_hinge(model, shift, batch, cfg, own, row, **weights).backward()
    assert sum(float(p.grad.abs().sum()) for p in shift.parameters()) > 0


class _Traced:
    """The localisation's tensors build_support reads (one layer, 10 neurons)."""

    def __init__(self):
        self.tensors = {"target_neurons": torch.tensor([2]), "english_neurons": torch.tensor([7]),
                        "neuron_mu_target": torch.tensor([0., 5., 9., 0., -3., 0., 1., 0., 0., 0.]),
                        "neuron_mu_english": torch.zeros(10)}

    def t(self, layer, name):
        return self.tensors[name]


def test_extra_neurons_add_the_largest_contrasts_and_random_matches_the_count():
    from steering.steer.supports import build_support

    scales = {0: torch.tensor([1., 1., 1., 1., 1., 1., 0.25, 1., 1., 1.])}  # neuron 6: 1/0.25
    traced = build_support("traced", _Traced(), [0], scales)
    assert traced.index[0].tolist() == [2, 7]
    more = build_support("traced", _Traced(), [0], scales, extra=3)
    # |μ_t − μ_en|/σ among the untraced: neuron 1 (5), 6 (4), 4 (3); neuron 2 (9) is traced
    assert more.index[0].tolist() == [1, 2, 4, 6, 7]
    assert torch.allclose(more.init[0], torch.tensor([5., 9., -3., 4., 0.]))
    assert torch.equal(more.scale[0], scales[0][more.index[0]])
    assert build_support("random", _Traced(), [0], scales, extra=3).index[0].numel() == 5
    assert build_support("traced", _Traced(), [0], scales, extra=50).index[0].numel() == 10
    with pytest.raises(LearnedSteerError, match="extra"):
        build_support("traced", _Traced(), [0], scales, extra=-1)
