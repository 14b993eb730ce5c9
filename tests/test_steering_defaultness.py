"""ΔM against a direct computation: greedy by hand with full forwards, no KV cache, no padding."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from steering.language.defaultness import DEFAULT_TEMPLATE, defaultness
from steering.language.token_sets import LanguageTokenSets

# Uneven lengths, so a batch of them is left-padded by up to ~20 tokens.
PROMPTS = [
    "Hi.",
    "Explain how rain forms over the ocean and why some clouds never produce any rain at all.",
    "Name a fruit.",
    "Describe a quiet morning in a small town.",
    "Why do we sleep?",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hand_sets(vocab_size: int) -> LanguageTokenSets:
    """Big arbitrary sets so that the masses are far from 0 (a random model spreads mass)."""
    ids = np.arange(vocab_size)
    return LanguageTokenSets.from_ids({"es": ids[ids % 3 == 0], "en": ids[ids % 3 == 1]},
                                      vocab_size)


def direct_delta_m(model, tokenizer, prompt: str, sets: LanguageTokenSets, steps: int):
    """One prompt, full forward over the whole context at every step."""
    ids = tokenizer(DEFAULT_TEMPLATE.format(prompt=prompt))["input_ids"]
    es, en = sets.mask("es", model.config.vocab_size), sets.mask("en", model.config.vocab_size)
    m_es, m_en, tokens = [], [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            probs = torch.softmax(logits.double(), -1)
            m_es.append(float(probs[es].sum()))
            m_en.append(float(probs[en].sum()))
            tokens.append(int(logits.argmax()))
            ids = ids + [tokens[-1]]
    return np.mean(np.array(m_es) - np.array(m_en)), m_es, m_en, tokens


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_delta_m_matches_direct_computation_batched_and_alone(load_tiny, arch):
    model, tokenizer, _ = load_tiny(arch)
    sets = hand_sets(len(tokenizer))
    steps = 2
    expected = [direct_delta_m(model, tokenizer, p, sets, steps) for p in PROMPTS]
    lengths = [len(tokenizer(DEFAULT_TEMPLATE.format(prompt=p))["input_ids"]) for p in PROMPTS]
    assert max(lengths) - min(lengths) >= 10  # the batch really is left-padded
    for batch_size in (1, 4, len(PROMPTS)):
        result = defaultness(model, tokenizer, PROMPTS, sets, "es", steps=steps,
                             batch_size=batch_size)
        assert result.delta_m.shape == (len(PROMPTS),)
        assert result.mass_target.shape == result.mass_english.shape == (len(PROMPTS), steps)
        for row, (dm, m_es, m_en, tokens) in enumerate(expected):
            assert result.tokens[row].tolist() == tokens, (batch_size, row)
            np.testing.assert_allclose(result.mass_target[row].numpy(), m_es, atol=2e-5)
            np.testing.assert_allclose(result.mass_english[row].numpy(), m_en, atol=2e-5)
            assert abs(float(result.delta_m[row]) - dm) < 2e-5
    # the sets hold ~1/3 of the mass each; ΔM is a small difference of two large numbers
    assert 0.2 < float(result.mass_target.mean()) < 0.5
    assert float(result.delta_m.abs().max()) > 1e-3


def test_delta_m_default_three_steps_and_template(load_tiny):
    model, tokenizer, _ = load_tiny("llama")
    sets = hand_sets(len(tokenizer))
    result = defaultness(model, tokenizer, PROMPTS[:2], sets, "es", batch_size=2)
    assert result.steps == 3
    assert result.prompts[0] == "Question: Hi.\nAnswer:"
    dm, *_ = direct_delta_m(model, tokenizer, PROMPTS[1], sets, 3)
    assert abs(float(result.delta_m[1]) - dm) < 2e-5
    other = defaultness(model, tokenizer, PROMPTS[:2], sets, "es", batch_size=2,
                        template="Q: {prompt}\nA:")
    assert other.prompts[0] == "Q: Hi.\nA:"
    assert not torch.allclose(other.delta_m, result.delta_m)


def test_intervention_is_entered_per_batch_and_changes_delta_m(load_tiny):
    model, tokenizer, _ = load_tiny("llama")
    sets = hand_sets(len(tokenizer))
    es_ids = sets.id_tensor("es")
    entered = []

    @contextmanager
    def push_spanish():
        def hook(_module, _inputs, output):
            output = output.clone()
            output[..., es_ids] += 2.0  # a large logit bonus on V_es
            return output
        handle = model.lm_head.register_forward_hook(hook)
        entered.append(1)
        try:
            yield
        finally:
            handle.remove()

    base = defaultness(model, tokenizer, PROMPTS, sets, "es", batch_size=2)
    pushed = defaultness(model, tokenizer, PROMPTS, sets, "es", batch_size=2,
                         intervention=push_spanish)
    assert len(entered) == 3  # ceil(5 / 2) batches
    assert (pushed.delta_m > base.delta_m + 0.3).all()
    assert (pushed.mass_target > 0.7).all()
    again = defaultness(model, tokenizer, PROMPTS, sets, "es", batch_size=2)  # hook removed
    torch.testing.assert_close(again.delta_m, base.delta_m)


def test_bad_inputs_are_refused(load_tiny):
    model, tokenizer, _ = load_tiny("llama")
    sets = hand_sets(len(tokenizer))
    with pytest.raises(ValueError, match="placeholder"):
        defaultness(model, tokenizer, PROMPTS, sets, "es", template="Question:")
    with pytest.raises(Exception, match="'hi'"):
        defaultness(model, tokenizer, PROMPTS, sets, "hi")
    too_big = LanguageTokenSets.from_ids({"es": [5, len(tokenizer) + 500], "en": [6]},
                                         len(tokenizer) + 1000)
    with pytest.raises(ValueError, match="logits"):
        defaultness(model, tokenizer, PROMPTS, too_big, "es")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("decoding", [{"repetition_penalty": 1.5},
                                      {"no_repeat_ngram_size": 2},
                                      {"no_repeat_ngram_size": 3},
                                      {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3}])
def test_decoding_options_decode_as_generate_does(load_tiny, arch, decoding):
    from steering.language.defaultness import greedy_language_masses, left_pad

    model, tokenizer, _ = load_tiny(arch)
    sets = hand_sets(len(tokenizer))
    set_ids = [sets.id_tensor("es", "cpu"), sets.id_tensor("en", "cpu")]
    pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    ids, attn = left_pad([tokenizer(DEFAULT_TEMPLATE.format(prompt=p))["input_ids"]
                          for p in PROMPTS], pad)
    steps = 16
    with torch.no_grad():
        plain_masses, plain = greedy_language_masses(model, ids, attn, set_ids, steps)
        masses, tokens = greedy_language_masses(model, ids, attn, set_ids, steps, **decoding)
        reference = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=steps,
                                   min_new_tokens=steps, do_sample=False, pad_token_id=pad,
                                   **decoding)[:, ids.shape[1]:]
    assert torch.equal(tokens, reference)
    assert not torch.equal(tokens, plain)  # the option changed the decode here
    # the masses are the model's own distribution: the same until the paths part
    assert torch.allclose(masses[..., 0], plain_masses[..., 0])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sparse_no_repeat_bans_equal_the_processor(n):
    """The decode's no-repeat path against transformers' processor on rows built to repeat
    (a 3-token alphabet: many steps hit a banned n-gram), ids past the logits included."""
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    from steering.language.defaultness import _no_repeat_bans

    g = torch.Generator().manual_seed(n)
    hits = 0
    for length in range(1, 20):
        seen = torch.randint(0, 3, (6, length), generator=g)
        seen[0, 0] = 40  # past the logits: never banned
        logits = torch.randn(6, 30, generator=g)
        logits[:, :3] += 5  # the argmax is in the alphabet
        want = NoRepeatNGramLogitsProcessor(n)(seen, logits.clone()).argmax(-1)
        banned = _no_repeat_bans(seen, n, logits.shape[-1])
        got = logits.index_put(banned, torch.tensor(-float("inf"))).argmax(-1)
        assert torch.equal(got, want)
        hits += int((want != logits.argmax(-1)).sum())
    assert hits > 10  # the ban changed many choices


def test_bad_decoding_options(load_tiny):
    from steering.language.defaultness import greedy_language_masses, left_pad

    model, tokenizer, _ = load_tiny("llama")
    ids, attn = left_pad([tokenizer("Hi")["input_ids"]], 0)
    set_ids = [torch.tensor([1]), torch.tensor([2])]
    with pytest.raises(ValueError, match="repetition_penalty"):
        greedy_language_masses(model, ids, attn, set_ids, 2, repetition_penalty=0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        greedy_language_masses(model, ids, attn, set_ids, 2, no_repeat_ngram_size=-1)
