"""The relevance guard: an answer counts only if it is about its own question.

Language ID, script and loop guards can all be passed by fluent target-language filler that
is the same for every question (a learned shift on every neuron of every layer wrote such
Hindi on the demo model). The guard asks the *unsteered* model whether the answer belongs to
its question, by pointwise mutual information against the other questions::

    PMI_i = mean_k NLL(a_i | q_{i+k}) − NLL(a_i | q_i)        (nats/token, k = 1 … K)

with every NLL the mean per token of the answer's first ``max_tokens`` tokens, each question
asked in the target language (translated prompt and template, :mod:`steering.evaluate.native`) where a
translation exists, else in English with the English template. An answer that fits any
question equally well has PMI ≈ 0; a real answer to its own question is cheaper under it.

The threshold τ is calibrated on the **tuning** split from the native row itself: the
``keep`` quantile (default 5%) of the PMI of the model's own native answers, so that the native
row keeps about 95% of its passes by construction and every method is held to the same τ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch


class RelevanceError(ValueError):
    """The relevance guard cannot be computed (names the bad input)."""


@dataclass
class RelevanceSettings:
    n_others: int = 4  # K: other questions each answer is compared against
    max_tokens: int = 24  # answer tokens scored
    quantile: float = 0.05  # τ = this quantile of the native tuning answers' PMI

    def __post_init__(self):
        if self.n_others < 1:
            raise RelevanceError(f"relevance.n_others={self.n_others}: must be ≥ 1")
        if self.max_tokens < 1:
            raise RelevanceError(f"relevance.max_tokens={self.max_tokens}: must be ≥ 1")
        if not 0 <= self.quantile < 1:
            raise RelevanceError(f"relevance.quantile={self.quantile}: must be in [0, 1)")


def relevance_pmi(model, tokenizer, questions: Sequence[str], answers: Sequence[Sequence[int]],
                  template: str, settings: RelevanceSettings = RelevanceSettings(),
                  batch_size: int = 16, rows: Sequence[int] | None = None) -> np.ndarray:
    """PMI_i (module docstring) of each answer (token ids) for its question; NaN for an empty
    answer. ``questions`` are already in the language of ``template``.

    ``rows``: score only these answers (NaN elsewhere). PMI_i depends on answer i and the
    question list only, so a subset gives exactly the values of the full call; tuning uses it
    to score only the answers that pass every other guard (the others fail DEFAULT anyway)."""
    n = len(questions)
    if n != len(answers):
        raise RelevanceError(f"{n} questions but {len(answers)} answers")
    if n < 2:
        raise RelevanceError("the relevance guard needs at least two questions to compare")
    chosen = list(range(n)) if rows is None else sorted({int(i) for i in rows})
    if chosen and not 0 <= chosen[0] <= chosen[-1] < n:
        raise RelevanceError(f"rows {chosen[:3]}… out of range for {n} answers")
    out = np.full(n, np.nan)
    if not chosen:
        return out
    k_max = min(settings.n_others, n - 1)
    cut = {i: list(answers[i])[:settings.max_tokens] for i in chosen}
    # every (question, answer) pair to score, grouped by question: each question's prompt goes
    # through the model once for all the answers scored after it (K + 1 of them)
    pairs: dict[int, list[int]] = {}
    for i in chosen:
        for k in range(k_max + 1):
            pairs.setdefault((i + k) % n, []).append(i)
    asked = sorted(pairs)
    nll = shared_prompt_nll(model, tokenizer, [questions[j] for j in asked],
                            [[cut[i] for i in pairs[j]] for j in asked], template, batch_size)
    scored = {(j, i): v for j, values in zip(asked, nll) for i, v in zip(pairs[j], values)}
    for i in chosen:
        own = scored[(i, i)]
        others = [scored[((i + k) % n, i)] for k in range(1, k_max + 1)]
        out[i] = float(np.mean(others)) - own
    return out


@torch.no_grad()
def shared_prompt_nll(model, tokenizer, prompts: Sequence[str],
                      continuations: Sequence[Sequence[Sequence[int]]], template: str,
                      batch_size: int = 16) -> list[np.ndarray]:
    """Mean NLL (nats/token) under the model of each continuation in ``continuations[p]``
    after prompt ``p`` (formatted with ``template``); NaN for an empty one. Equal to
    :func:`steering.evaluate.harness.continuation_nll` of every pair (tested), but each prompt
    is run once and its KV cache shared by its continuations: the relevance PMI scores each
    answer after K + 1 questions, and the prompt is about half of every row's tokens."""
    from steering.evaluate.harness import continuation_nll
    from steering.language.defaultness import (_cache_keyword, _returned_cache, left_pad,
                                               pad_token_id)
    from steering.language.head import OutputHead, decoder_body

    out = [np.full(len(c), np.nan) for c in continuations]
    body, head = decoder_body(model), OutputHead.of(model)
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    encoded = tokenizer([template.format(prompt=p) for p in prompts])["input_ids"]
    shareable = True  # until a prompt pass returns a cache that cannot be copied per row
    for start in range(0, len(prompts), batch_size):
        block = range(start, min(start + batch_size, len(prompts)))
        rows = [(p, j, list(c)) for p in block for j, c in enumerate(continuations[p]) if c]
        if not rows:
            continue
        if shareable:
            ids, attn = left_pad([encoded[p] for p in block], pad)
            prompt_pos = (attn.cumsum(-1) - 1).clamp(min=0)
            first = body(input_ids=ids.to(device), attention_mask=attn.to(device),
                         position_ids=prompt_pos.to(device), use_cache=True)
            cache = _returned_cache(first)
            shareable = cache is not None and hasattr(cache, "batch_select_indices")
        if not shareable:
            # a model whose cache cannot be shared between rows: one row per pair
            nll = continuation_nll(model, tokenizer, [prompts[p] for p, _, _ in rows],
                                   [c for _, _, c in rows], 0, template, batch_size)
            for (p, j, _), v in zip(rows, nll):
                out[p][j] = v
            continue
        which = torch.tensor([p - start for p, _, _ in rows])
        cache.batch_select_indices(which.to(device))  # one copy of the prompt per row
        # continuations right-padded after their prompt: a pad only follows real tokens
        width = max(len(c) for _, _, c in rows)
        cont = torch.full((len(rows), width), pad, dtype=torch.long)
        cont_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (_, _, c) in enumerate(rows):
            cont[r, :len(c)] = torch.tensor(c)
            cont_mask[r, :len(c)] = 1
        mask = torch.cat([attn[which], cont_mask], 1)
        pos = prompt_pos[which, -1:] + 1 + torch.arange(width)
        rest = body(input_ids=cont.to(device), attention_mask=mask.to(device),
                    position_ids=pos.to(device), use_cache=True,
                    **{_cache_keyword(body): cache})
        # token t of a continuation is predicted at t − 1; token 0 by the prompt's last state
        hidden = torch.cat([first.last_hidden_state[which.to(device), -1:],
                            rest.last_hidden_state[:, :-1]], 1)
        valid = cont_mask.bool()
        nll = head.token_nll(hidden[valid.to(device)], cont[valid].to(device)).float().cpu()
        row_of = torch.arange(len(rows))[:, None].expand(-1, width)[valid]
        sums = torch.zeros(len(rows)).index_add_(0, row_of, nll)
        for r, (p, j, c) in enumerate(rows):
            out[p][j] = float(sums[r]) / len(c)
    return out


@dataclass
class RelevanceCheck:
    """The guard as the harness applies it: τ, the template the questions are asked in, and
    each English prompt's question in that language (a prompt without one is asked as is)."""

    tau: float
    template: str
    settings: RelevanceSettings = field(default_factory=RelevanceSettings)
    questions: dict[str, str] = field(default_factory=dict)
    calibration_answers: int = 0  # how many native answers τ was calibrated on

    def pmi(self, model, tokenizer, prompts: Sequence[str], answers: Sequence[Sequence[int]],
            batch_size: int = 16, rows: Sequence[int] | None = None) -> np.ndarray:
        asked = [self.questions.get(p, p) for p in prompts]
        return relevance_pmi(model, tokenizer, asked, answers, self.template, self.settings,
                             batch_size, rows)

    def passes(self, pmi: Sequence[float]) -> np.ndarray:
        """The guard's verdict per answer: 1.0 where PMI ≥ τ, else 0.0 (NaN: an empty answer)."""
        return np.array([float(np.isfinite(v) and v >= self.tau) for v in pmi])


def calibrate_threshold(native_pmi: Sequence[float], quantile: float) -> float:
    """τ: the ``quantile`` of the native answers' PMI (NaNs dropped)."""
    values = np.asarray([v for v in native_pmi if v is not None and np.isfinite(v)])
    if values.size == 0:
        raise RelevanceError("no native answer to calibrate the relevance threshold on")
    return float(np.quantile(values, quantile))
