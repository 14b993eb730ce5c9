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
    from steering.evaluate.harness import continuation_nll

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
    cut = [list(answers[i])[:settings.max_tokens] for i in chosen]
    own = continuation_nll(model, tokenizer, [questions[i] for i in chosen], cut, 0, template,
                           batch_size)
    others = np.stack([continuation_nll(model, tokenizer,
                                        [questions[(i + k) % n] for i in chosen], cut, 0,
                                        template, batch_size)
                       for k in range(1, k_max + 1)])
    out[chosen] = others.mean(0) - own
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
