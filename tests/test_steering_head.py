"""The chunked LM head: the model's own logits, the exact token NLL and its gradient.

Every teacher-forced score of the steer stage goes through ``OutputHead.token_nll`` (the
relevance PMI, the continuation NLL guard, the learned steer's answer NLL), so it is checked
against the plain ``log_softmax`` of the model's own logits on real tiny models, with chunk
sizes that leave a partial last chunk and targets on chunk boundaries.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steering.evaluate.harness import continuation_nll
from steering.language.defaultness import DEFAULT_TEMPLATE
from steering.language.head import OutputHead, decoder_body, default_chunk

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plain_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_head_matches_the_models_logits_and_nll(load_tiny, arch):
    model, tokenizer, _ = load_tiny(arch)
    ids = tokenizer(["The river runs past the old mill.", "Name a fruit."],
                    padding=True, return_tensors="pt")
    with torch.no_grad():
        full = model(**ids).logits
        hidden = decoder_body(model)(**ids).last_hidden_state
        head = OutputHead.of(model)
        torch.testing.assert_close(head.logits(hidden), full.float(), atol=1e-5, rtol=1e-5)
        flat = hidden.flatten(0, 1)
        vocab = full.shape[-1]
        # every boundary case: first/last row of a chunk, the last partial chunk
        targets = torch.tensor([0, 99, 100, 101, vocab - 1, 250, 7, 512, 300, 1, 2, 3] * 4)
        targets = targets[:flat.shape[0]]
        flat = flat[:targets.shape[0]]
        want = _plain_nll(full.flatten(0, 1)[:targets.shape[0]], targets)
        for chunk in (100, 333, vocab, 4 * vocab):
            got = head.token_nll(flat, targets, chunk=chunk)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _synthetic_head(softcap, scale, bias: bool, dtype=torch.float32) -> OutputHead:
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(1000, 32, generator=g).to(dtype)
    b = torch.randn(1000, generator=g).to(dtype) if bias else None
    return OutputHead(weight, b, softcap, scale)


@pytest.mark.parametrize("softcap,scale,bias", [(None, 1.0, False), (5.0, 1.0, True),
                                                (3.0, 0.25, False), (None, 2.0, True)])
def test_token_nll_value_and_gradient_match_autograd(softcap, scale, bias):
    head = _synthetic_head(softcap, scale, bias)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(37, 32, generator=g)
    targets = torch.randint(0, 1000, (37,), generator=g)
    weights = torch.rand(37, generator=g)

    plain_in = hidden.clone().requires_grad_(True)
    plain = _plain_nll(head.logits(plain_in), targets)
    (plain * weights).sum().backward()

    chunked_in = hidden.clone().requires_grad_(True)
    chunked = head.token_nll(chunked_in, targets, chunk=128)
    (chunked * weights).sum().backward()

    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_in.grad, plain_in.grad, atol=1e-5, rtol=1e-4)
    assert chunked_in.grad.abs().max() > 1e-3  # a gradient that exists


@pytest.mark.parametrize("softcap,scale,bias", [(None, 1.0, False), (4.0, 0.5, True)])
def test_kl_and_nll_match_the_full_distributions(softcap, scale, bias):
    head = _synthetic_head(softcap, scale, bias)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(29, 32, generator=g)
    steered = base + 0.3 * torch.randn(29, 32, generator=g)
    targets = torch.randint(0, 1000, (29,), generator=g)
    nll_s, nll_b, kl = head.kl_and_nll(steered, base, targets, chunk=150)
    logp_s, logp_b = head.logits(steered).log_softmax(-1), head.logits(base).log_softmax(-1)
    torch.testing.assert_close(nll_s, -logp_s.gather(-1, targets[:, None])[:, 0])
    torch.testing.assert_close(nll_b, -logp_b.gather(-1, targets[:, None])[:, 0])
    want = (logp_s.exp() * (logp_s - logp_b)).sum(-1)
    assert want.mean() > 0.05  # distributions that differ
    torch.testing.assert_close(kl, want, atol=1e-5, rtol=1e-4)
    same = head.kl_and_nll(base, base, targets, chunk=150)[2]
    assert same.abs().max() < 1e-5
    with pytest.raises(ValueError, match="steered and base"):
        head.kl_and_nll(steered[:3], base, targets)


def test_bf16_head_matches_the_plain_path_on_the_same_bf16_logits():
    head = _synthetic_head(None, 1.0, False, torch.bfloat16)
    hidden = torch.randn(64, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
    targets = torch.arange(64) * 15
    want = _plain_nll(torch.nn.functional.linear(hidden, head.weight), targets)
    torch.testing.assert_close(head.token_nll(hidden, targets, chunk=96), want,
                               atol=1e-4, rtol=1e-5)


def test_continuation_nll_equals_the_full_forward(load_tiny):
    """The harness's teacher-forced NLL (left padding, skipped tokens) against one plain
    forward per row."""
    model, tokenizer, _ = load_tiny("llama")
    prompts = ["Hi.", "Describe a quiet morning in a small town by the sea."]
    conts = [tokenizer(" It was calm and the boats slept.", add_special_tokens=False)
             ["input_ids"], tokenizer(" Yes", add_special_tokens=False)["input_ids"][:1]]
    got = continuation_nll(model, tokenizer, prompts, conts, skip=1, batch_size=2)
    assert np.isnan(got[1])  # one token, skipped: nothing left to score
    ids = tokenizer(DEFAULT_TEMPLATE.format(prompt=prompts[0]))["input_ids"] + conts[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    n = len(conts[0])
    cols = torch.arange(len(ids) - n + 1, len(ids))
    want = _plain_nll(logits[cols - 1], torch.tensor(ids)[cols]).mean()
    assert got[0] == pytest.approx(float(want), abs=1e-5)


def test_token_nll_refuses_bad_input():
    head = _synthetic_head(None, 1.0, False)
    with pytest.raises(ValueError, match=r"hidden \(R, d\) and targets \(R,\)"):
        head.token_nll(torch.randn(2, 3, 32), torch.zeros(2, dtype=torch.long))
    trainable = OutputHead(head.weight.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="freeze"):
        trainable.token_nll(torch.randn(2, 32), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="not a Linear"):
        OutputHead.of(torch.nn.Module.__new__(_NoLinearHead))
    assert head.token_nll(torch.randn(0, 32), torch.zeros(0, dtype=torch.long)).shape == (0,)


class _NoLinearHead(torch.nn.Module):
    config = None

    def get_output_embeddings(self):
        return torch.nn.Identity()


def test_default_chunk_fits_the_cache_on_cpu():
    cpu = torch.device("cpu")
    assert default_chunk(400, cpu) == 1024
    assert default_chunk(48, cpu) == 8192
    assert default_chunk(1, cpu) == 16384
    assert default_chunk(400, torch.device("cuda")) == 65536


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("no_repeat", [0, 2])
def test_greedy_decode_scores_the_vocabulary_in_chunks_as_the_full_softmax(load_tiny, arch,
                                                                          no_repeat):
    """The decode's chunked path (HeadBypass + step_masses) against its full-logits path,
    which a (no-op) hook on the head forces."""
    from steering.language.defaultness import greedy_language_masses, left_pad, pad_token_id
    from steering.language.head import HeadBypass

    model, tokenizer, _ = load_tiny(arch)
    vocab = len(tokenizer)
    set_ids = [torch.arange(0, vocab, 7), torch.arange(1, vocab, 5)]
    ids, attn = left_pad([tokenizer(DEFAULT_TEMPLATE.format(prompt=p))["input_ids"]
                          for p in ("Hi.", "Why do we sleep at night?", "Name a fruit.")],
                         pad_token_id(tokenizer))
    assert HeadBypass.applies(model)
    chunked = greedy_language_masses(model, ids, attn, set_ids, 12,
                                     no_repeat_ngram_size=no_repeat)
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: None)
    try:
        assert not HeadBypass.applies(model)
        full = greedy_language_masses(model, ids, attn, set_ids, 12,
                                      no_repeat_ngram_size=no_repeat)
    finally:
        handle.remove()
    assert torch.equal(chunked[1], full[1])
    torch.testing.assert_close(chunked[0], full[0], atol=1e-6, rtol=1e-5)
    assert model.get_output_embeddings() is not None and HeadBypass.applies(model)


def test_head_bypass_restores_the_head_after_an_error(load_tiny):
    from steering.language.head import HeadBypass

    model, tokenizer, _ = load_tiny("llama")
    head = model.get_output_embeddings()
    with pytest.raises(RuntimeError, match="inside"):
        with HeadBypass(model) as bypass:
            out = model(**tokenizer(["Hi there"], return_tensors="pt"), logits_to_keep=1)
            assert out.logits.shape[-1] == 1 and bypass.hidden.shape[-1] == head.in_features
            raise RuntimeError("inside")
    assert model.get_output_embeddings() is head


def test_step_masses_with_softcap_and_ties():
    head = _synthetic_head(2.0, 1.0, True)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, 32, generator=g)
    mask = torch.zeros(1000, 2)
    mask[::3, 0], mask[1::4, 1] = 1, 1
    masses, best = head.step_masses(hidden, mask, chunk=128)
    probs = head.logits(hidden).softmax(-1)
    torch.testing.assert_close(masses, probs @ mask)
    assert torch.equal(best, head.logits(hidden).argmax(-1))
    logits = head.logits(hidden)
    banned = (torch.tensor([0, 0, 3]), torch.stack([logits[0].argmax(), logits[0].topk(2)[1][1],
                                                    logits[3].argmax()]))
    masses_b, best_b = head.step_masses(hidden, mask, chunk=128, banned=banned)
    torch.testing.assert_close(masses_b, masses)  # the ban moves the choice, not the masses
    assert torch.equal(best_b, logits.index_put(banned, torch.tensor(-float("inf"))).argmax(-1))
    assert best_b[0] != best[0] and best_b[1] == best[1]
    tied = OutputHead(torch.zeros(300, 4))  # every logit equal: the first index, as argmax
    assert tied.step_masses(torch.ones(2, 4), torch.ones(300, 1), chunk=64)[1].tolist() == [0, 0]
