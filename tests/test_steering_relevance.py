"""The relevance guard (steering.relevance) on the tiny random Llama.

Filler that is the same for every question has a mean PMI of exactly zero (each answer is
scored against the same questions as its own); the model's own greedy answers to distinct
questions are cheaper under their own question than under the others (PMI > 0), and τ is a
quantile of the native answers' PMI.
"""

from __future__ import annotations

import numpy as np
import pytest

from steering.language.defaultness import DEFAULT_TEMPLATE
from steering.evaluate.harness import continuation_nll
from steering.evaluate.relevance import (RelevanceError, RelevanceSettings, calibrate_threshold,
                                         relevance_pmi, shared_prompt_nll)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["Explain how rain forms.", "Why is the sky blue?", "Name three fruits.",
             "What is a river?", "Describe a cat.", "How do birds fly?"]


def _greedy_answers(model, tokenizer, n_new=12):
    answers = []
    for q in QUESTIONS:
        ids = tokenizer(DEFAULT_TEMPLATE.format(prompt=q), return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=n_new, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers.append(out[0, ids["input_ids"].shape[1]:].tolist())
    return answers


def test_same_filler_for_every_question_has_zero_mean_pmi(load_tiny):
    model, tokenizer, _ = load_tiny("llama")
    filler = tokenizer(" the same words for every question", add_special_tokens=False)
    pmi = relevance_pmi(model, tokenizer, QUESTIONS, [filler["input_ids"]] * len(QUESTIONS),
                        DEFAULT_TEMPLATE, RelevanceSettings(n_others=len(QUESTIONS) - 1))
    assert abs(float(np.mean(pmi))) < 1e-4


def test_own_answers_are_relevant(load_tiny):
    model, tokenizer, _ = load_tiny("llama")
    answers = _greedy_answers(model, tokenizer)
    pmi = relevance_pmi(model, tokenizer, QUESTIONS, answers, DEFAULT_TEMPLATE,
                        RelevanceSettings(n_others=3))
    assert (pmi > 0).all() and float(np.mean(pmi)) > 0.01
    shuffled = answers[1:] + answers[:1]  # each answer paired with another question
    pmi_wrong = relevance_pmi(model, tokenizer, QUESTIONS, shuffled, DEFAULT_TEMPLATE,
                              RelevanceSettings(n_others=3))
    assert float(np.mean(pmi_wrong)) < float(np.mean(pmi))
    tau = calibrate_threshold(pmi, 0.0)
    assert tau == pytest.approx(float(np.min(pmi)))


def test_a_subset_of_rows_scores_exactly_as_the_full_call(load_tiny):
    """Tuning scores only the answers that pass the other guards: the same numbers."""
    model, tokenizer, _ = load_tiny("llama")
    answers = _greedy_answers(model, tokenizer)
    settings = RelevanceSettings(n_others=3)
    full = relevance_pmi(model, tokenizer, QUESTIONS, answers, DEFAULT_TEMPLATE, settings)
    part = relevance_pmi(model, tokenizer, QUESTIONS, answers, DEFAULT_TEMPLATE, settings,
                         rows=[4, 1])
    assert np.isnan(part[[0, 2, 3, 5]]).all()
    np.testing.assert_allclose(part[[1, 4]], full[[1, 4]], rtol=0, atol=1e-5)
    assert np.isnan(relevance_pmi(model, tokenizer, QUESTIONS, answers, DEFAULT_TEMPLATE,
                                  settings, rows=[])).all()
    with pytest.raises(RelevanceError, match="out of range"):
        relevance_pmi(model, tokenizer, QUESTIONS, answers, DEFAULT_TEMPLATE, settings,
                      rows=[6])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_shared_prompt_nll_equals_one_row_per_pair(load_tiny, arch):
    """Each prompt run once, its KV cache copied to every continuation scored after it: the
    same NLLs as the plain left-padded pass of each (prompt, continuation) pair — prompts of
    different lengths, continuations of different lengths, an empty one, blocks of 2 prompts."""
    model, tokenizer, _ = load_tiny(arch)
    answers = _greedy_answers(model, tokenizer)
    lengths = [12, 7, 3, 12, 1, 9]
    conts = [[answers[(p + k) % len(QUESTIONS)][:lengths[(p + k) % 6]] for k in range(3)]
             for p in range(len(QUESTIONS))]
    conts[2][1] = []
    shared = shared_prompt_nll(model, tokenizer, QUESTIONS, conts, DEFAULT_TEMPLATE,
                               batch_size=2)
    for p, row in enumerate(conts):
        plain = continuation_nll(model, tokenizer, [QUESTIONS[p]] * len(row),
                                 [list(c) for c in row], 0, DEFAULT_TEMPLATE)
        np.testing.assert_allclose(shared[p], plain, rtol=0, atol=2e-5, err_msg=str(p))
    assert np.isnan(shared[2][1]) and np.isfinite(shared[2][0])
    assert all(np.isfinite(v).sum() >= 2 for v in shared)


def test_shared_prompt_nll_without_a_selectable_cache_scores_row_by_row(load_tiny, monkeypatch):
    """A model whose KV cache cannot be copied per row (older transformers return tuples):
    every pair is scored as its own row, with the same numbers."""
    from transformers import cache_utils

    model, tokenizer, _ = load_tiny("llama")
    answers = _greedy_answers(model, tokenizer)
    conts = [[answers[p], answers[(p + 1) % len(QUESTIONS)][:5]] for p in range(len(QUESTIONS))]
    shared = shared_prompt_nll(model, tokenizer, QUESTIONS, conts, DEFAULT_TEMPLATE,
                               batch_size=4)
    monkeypatch.delattr(cache_utils.Cache, "batch_select_indices", raising=False)
    monkeypatch.delattr(cache_utils.DynamicCache, "batch_select_indices", raising=False)
    assert not hasattr(cache_utils.DynamicCache(), "batch_select_indices")
    row_by_row = shared_prompt_nll(model, tokenizer, QUESTIONS, conts, DEFAULT_TEMPLATE,
                                   batch_size=4)
    for a, b in zip(shared, row_by_row):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)


@pytest.mark.parametrize("bad", [dict(n_others=0), dict(max_tokens=0), dict(quantile=1.0)])
def test_bad_relevance_settings(bad):
    with pytest.raises(RelevanceError, match=next(iter(bad))):
        RelevanceSettings(**bad)


def test_relevance_needs_two_questions(load_tiny):
    model, tokenizer, _ = load_tiny("llama")
    with pytest.raises(RelevanceError, match="two questions"):
        relevance_pmi(model, tokenizer, ["q"], [[1, 2]], DEFAULT_TEMPLATE)
