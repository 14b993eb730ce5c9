"""One evaluation harness for every steering method (DESIGN "Evaluation protocol").

For a method (a :class:`~steering.steer.artifact.SteeringArtifact`, or ``None`` for the unsteered
model) and a target language:

**Generations** on neutral English prompts (greedy, ``max_new_tokens``, batched with left
padding, the steer active as in use). From the same decode: ΔM over the first T steps
(:mod:`steering.language.defaultness`' definition, from the decode's own softmax), the head (first
``head_tokens`` = 16 new tokens) and the full continuation (up to the first EOS).
Each continuation is judged by :func:`steering.evaluate.judge.judge_continuation`:

- **DEFAULT** = ΔM > 0 and the head is identified as the target (ID restricted to
  {target, English}, confidence ≥ 0.9) and the continuation passes the fluency guards:
  not looping (distinct-2 ≥ 0.5, no word > 40% of the words, no tandem repeats), for
  non-Latin targets ≥ 80% of its letters in the target script, and its NLL under the
  *unsteered* model, over the tokens after the first steered ones (the prompt-end token and
  up to ``NLL_GUARD_MAX_SKIP`` = 4 decode steps), at most 1.0 nat/token above that of the
  unsteered continuation (the head's switch of language is expensive for the base model by
  definition, so those tokens are left out) plus the language offset when the caller gives
  one (:func:`language_nll_offset`: the unsteered model's NLL/token on held-out target text
  minus English text; the steer stage does by default, a stated departure: without it, fluent
  Hindi, +1.02 nats/token over English on this model's held-out sentences, would fail a
  1.0 guard for being Hindi).
- full-continuation and first-line language-ID rates (same guards); leakage to confusable
  languages (Portuguese/Italian/Catalan/Galician for Spanish, Marathi/Nepali/Urdu for Hindi).

**Held-out target sentences** (never seen by localisation or tuning): per-token
KL(steered ‖ base) of the next-token distributions and the in-language NLL change
(steered − base, nats/token), each in two position modes — ``gen``: as in generation, each
sentence's first token standing for the prompt end (it and the next ``decode_steps`` tokens
are steered); ``all``: every position steered. The bars refer to ``gen``; ``all`` is
reported next to it.

Every rate (DEFAULT, language ID, fluent, looping, leak, relevance) comes with a 95% Wilson
score interval, every mean (ΔM, KL, NLL) with a percentile-bootstrap 95% CI over prompts (or
sentences).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from steering.evaluate.judge import (FluencyGuards, bootstrap_ci, identifiers_for,
                                     judge_continuation, summarise, wilson_ci)
from steering.language.defaultness import (DEFAULT_TEMPLATE, greedy_language_masses, left_pad,
                                           pad_token_id)
from steering.language.head import OutputHead, decoder_body, final_hidden
from steering.language.token_sets import LanguageTokenSets
from steering.steer.artifact import SteeringArtifact
from steering.steer.runtime import prompt_with_prefix, steer

log = logging.getLogger(__name__)

HEAD_TOKENS = 16
# The NLL guard leaves out the prompt-end token and at most this many steered decode tokens:
# the switch of language there is expensive for the base model by definition. A steer that
# stays on for every decode step would otherwise leave nothing to judge.
NLL_GUARD_MAX_SKIP = 4


def nll_guard_skip(decode_steps: int) -> int:
    """Continuation tokens the fluency guard's NLL leaves out (module docstring)."""
    return 1 + min(int(decode_steps), NLL_GUARD_MAX_SKIP)


@dataclass
class EvalSettings:
    steps: int = 3  # T of ΔM
    max_new_tokens: int = 32
    head_tokens: int = HEAD_TOKENS
    batch_size: int = 16  # rows per full-vocabulary forward (held-out text, continuation NLL)
    # Rows per greedy decode. A decode step reads every weight (the 262k × d LM head above all)
    # for a handful of tokens, so on CPU its cost is nearly flat in the batch: 48 rows at once
    # take half the time of three batches of 16 (docs/results.md, "Demo wall time").
    gen_batch_size: int = 64
    template: str = DEFAULT_TEMPLATE
    # Greedy decoding with this repetition penalty (1: plain greedy, DESIGN's protocol).
    repetition_penalty: float = 1.0
    # ... and never repeating an n-gram of this size (0: off)
    no_repeat_ngram_size: int = 0
    n_boot: int = 2000
    seed: int = 0
    guards: FluencyGuards = field(default_factory=FluencyGuards)


def _context(model, artifact: SteeringArtifact | None, gamma: float | None = None, **kw):
    if artifact is None or not artifact.edits:
        return nullcontext()
    return steer(model, artifact, gamma=gamma, **kw)


# --------------------------------------------------------------------------- generation
@dataclass
class Generations:
    prompts: list[str]
    new_ids: list[list[int]]  # up to the first EOS
    heads: list[str]
    fulls: list[str]
    delta_m: np.ndarray  # (P,)
    seconds: float = 0.0


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], artifact: SteeringArtifact | None,
             token_sets: LanguageTokenSets, target: str, english: str = "en",
             settings: EvalSettings = EvalSettings(), gamma: float | None = None,
             max_new_tokens: int | None = None) -> Generations:
    """Greedy continuations of ``prompts`` (raw questions, formatted with the template and the
    method's prompt prefix) with the steer active, and ΔM of each."""
    started = time.perf_counter()
    n_new = max(settings.steps, max_new_tokens or settings.max_new_tokens)
    texts = [settings.template.format(prompt=prompt_with_prefix(artifact, p)) for p in prompts]
    device = next(model.parameters()).device
    set_ids = [token_sets.id_tensor(target, device), token_sets.id_tensor(english, device)]
    encoded = tokenizer(texts)["input_ids"]
    eos = {i for i in ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}
    new_ids, dm = [], []
    for start in range(0, len(texts), settings.gen_batch_size):
        ids, attn = left_pad(encoded[start:start + settings.gen_batch_size], pad_token_id(tokenizer))
        with _context(model, artifact, gamma):
            masses, tokens = greedy_language_masses(model, ids.to(device), attn.to(device),
                                                    set_ids, n_new,
                                                    settings.repetition_penalty,
                                                    settings.no_repeat_ngram_size)
        dm.append((masses[0, :, :settings.steps] - masses[1, :, :settings.steps]).mean(-1))
        for row in tokens.tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            new_ids.append(row[:cut])
    heads = [tokenizer.decode(r[:settings.head_tokens], skip_special_tokens=True) for r in new_ids]
    fulls = [tokenizer.decode(r, skip_special_tokens=True) for r in new_ids]
    return Generations(list(prompts), new_ids, heads, fulls, torch.cat(dm).numpy(),
                       time.perf_counter() - started)


@torch.no_grad()
def continuation_nll(model, tokenizer, prompts: Sequence[str], continuations: list[list[int]],
                     skip: int, template: str = DEFAULT_TEMPLATE, batch_size: int = 16,
                     artifact: SteeringArtifact | None = None) -> np.ndarray:
    """Mean NLL (nats/token) under the *unsteered* model of each continuation's tokens after
    the first ``skip`` (NaN when none are left). The prompt is formatted as the method saw it.

    Only the scored positions go through the LM head, in vocabulary chunks
    (:class:`steering.language.head.OutputHead`: no full-vocabulary float32 log-softmax)."""
    device = next(model.parameters()).device
    body, head = decoder_body(model), OutputHead.of(model)
    out = np.full(len(prompts), np.nan)
    rows = []
    for i, (p, cont) in enumerate(zip(prompts, continuations)):
        if len(cont) > skip:
            ids = tokenizer(template.format(prompt=prompt_with_prefix(artifact, p)))["input_ids"]
            rows.append((i, ids, cont))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, attn = left_pad([ids + cont for _, ids, cont in chunk], pad_token_id(tokenizer))
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        width = ids.shape[1]
        hidden = body(input_ids=ids.to(device), attention_mask=attn.to(device),
                      position_ids=pos.to(device), use_cache=False).last_hidden_state
        # left-padded: continuation b ends at the last column; column c is predicted at c - 1
        row_of, col_of = [], []
        for b, (_i, _ids, cont) in enumerate(chunk):
            cols = range(width - len(cont) + skip, width)
            row_of += [b] * len(cols)
            col_of += list(cols)
        row_t, col_t = torch.tensor(row_of), torch.tensor(col_of)
        nll = head.token_nll(hidden[row_t.to(device), (col_t - 1).to(device)],
                             ids[row_t, col_t].to(device)).cpu()
        for b, (i, _ids, _cont) in enumerate(chunk):
            out[i] = float(nll[row_t == b].mean())
    return out


# --------------------------------------------------------------------------- held-out text
@dataclass
class SentenceScores:
    nll_base: np.ndarray  # (S,) nats/token
    nll: dict  # mode → (S,) steered nats/token
    kl: dict  # mode → (S,) mean per-token KL(steered ‖ base)


class HeldOutText:
    """Held-out target sentences tokenised into left-padded batches, with the *unsteered*
    model's final hidden states at the scored positions computed once and kept.

    Every method and every tuning point compares its steered next-token distributions against
    the same base ones. Keeping the base hidden states and their token NLL (positions × d:
    0.4 MB for 16 sentences on Gemma-3-270m) rather than base log-probs (positions ×
    vocabulary float32: 1 GB for 48 sentences) saves the body's forward per call; the head recomputes base logits chunk by
    chunk next to the steered ones (:meth:`steering.language.head.OutputHead.kl_and_nll`).
    ``keep_base=False`` recomputes them each call."""

    def __init__(self, model, tokenizer, sentences: Sequence[str], batch_size: int = 16,
                 keep_base: bool = True):
        self.model, self.sentences, self.keep_base = model, list(sentences), keep_base
        self.head = OutputHead.of(model)
        device = next(model.parameters()).device
        encoded = tokenizer(self.sentences)["input_ids"]
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)) or [-1], device=device)
        self.batches = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            ids, attn = left_pad(chunk, pad_token_id(tokenizer))
            ids, attn = ids.to(device), attn.to(device)
            # The prompt-end stand-in: each row's first text token (after BOS / other
            # specials, which are never steered as a prompt end: their norms are far out of
            # distribution).
            first = (attn.shape[1] - attn.sum(-1)).long()
            rows = torch.arange(len(chunk), device=device)
            first = first + torch.isin(ids[rows, first], special).long()
            valid = attn[:, 1:].bool() & attn[:, :-1].bool()  # position c predicts c + 1
            self.batches.append({"start": start, "ids": ids, "attn": attn,
                                 "pos": (attn.cumsum(-1) - 1).clamp(min=0), "first": first,
                                 "valid": valid, "targets": ids[:, 1:][valid],
                                 "row": valid.nonzero()[:, 0], "base": None})

    def __len__(self) -> int:
        return len(self.sentences)

    def hidden(self, batch: dict) -> torch.Tensor:
        """(positions, d) final hidden states of one batch's scored positions under the model
        as it is now (steering hooks included)."""
        out = final_hidden(self.model, input_ids=batch["ids"], attention_mask=batch["attn"],
                           position_ids=batch["pos"])
        return out[:, :-1][batch["valid"]]

    def base(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, token NLL) of one batch's scored positions under the unsteered
        model, kept after the first call (``keep_base``)."""
        if batch["base"] is not None:
            return batch["base"]
        hidden = self.hidden(batch)
        base = hidden, self.head.token_nll(hidden, batch["targets"])
        if self.keep_base:
            batch["base"] = base
        return base


@torch.no_grad()
def sentence_scores(model, tokenizer, sentences: Sequence[str] | HeldOutText,
                    artifact: SteeringArtifact | None, modes: Sequence[str] = ("gen", "all"),
                    batch_size: int = 16, gamma: float | None = None) -> SentenceScores:
    """Per-sentence NLL of held-out target text, base and steered, and KL(steered ‖ base).
    ``sentences``: strings, or a :class:`HeldOutText` of them (its base states are reused)."""
    text = sentences if isinstance(sentences, HeldOutText) else \
        HeldOutText(model, tokenizer, sentences, batch_size, keep_base=False)
    if text.model is not model:
        raise ValueError("sentences were tokenised and scored for another model")
    n = len(text)
    nll_base = np.full(n, np.nan)
    nll = {m: np.full(n, np.nan) for m in modes}
    kl = {m: np.full(n, np.nan) for m in modes}
    for batch in text.batches:
        rows = slice(batch["start"], batch["start"] + len(batch["ids"]))
        counts = batch["valid"].sum(-1).clamp(min=1).float()

        def per_row(values):
            sums = torch.zeros(len(batch["ids"]), device=values.device)
            return (sums.index_add_(0, batch["row"], values) / counts).cpu().numpy()

        base, base_nll = text.base(batch)
        nll_base[rows] = per_row(base_nll)
        for mode in modes:
            if artifact is None or not artifact.edits:
                nll[mode][rows], kl[mode][rows] = nll_base[rows], 0.0
                continue
            # gen: the artifact's own position mode (an all-positions steer is measured
            # at all positions); all: every position whatever the artifact says.
            position = "all" if mode == "all" else artifact.position
            with steer(model, artifact, gamma=gamma, position=position) as s:
                if position == "prompt_end":
                    s.pin_prompt_end(batch["first"])
                steered = text.hidden(batch)
            steered_nll, _, divergence = text.head.kl_and_nll(steered, base, batch["targets"])
            nll[mode][rows] = per_row(steered_nll)
            kl[mode][rows] = per_row(divergence)
    return SentenceScores(nll_base, nll, kl)


# --------------------------------------------------------------------------- one method
def evaluate_method(model, tokenizer, artifact: SteeringArtifact | None, *, target: str,
                    english: str, prompts: Sequence[str], sentences: Sequence[str],
                    token_sets: LanguageTokenSets, settings: EvalSettings,
                    reference: Generations | None = None, reference_nll: np.ndarray | None = None,
                    identifiers=None, gamma: float | None = None, nll_offset: float = 0.0,
                    relevance=None) -> tuple[dict, Generations]:
    """Every metric of one method (module docstring). ``reference``: the unsteered
    generations (their continuation NLL is the fluency guard's baseline). ``nll_offset``
    (nats/token) is added to that baseline in the guard only (:func:`language_nll_offset`).
    ``relevance`` (a :class:`steering.evaluate.relevance.RelevanceCheck`): DEFAULT also needs
    the answer to be about its own question; its rate is reported as ``relevance``."""
    started = time.perf_counter()
    ids = identifiers or identifiers_for(target, english)
    gens = generate(model, tokenizer, prompts, artifact, token_sets, target, english, settings,
                    gamma=gamma)
    skip = nll_guard_skip(artifact.decode_steps if artifact is not None else 0)
    nll_cont = continuation_nll(model, tokenizer, prompts, gens.new_ids, skip,
                                settings.template, settings.batch_size, artifact)
    if reference_nll is None:
        reference_nll = nll_cont
    judgements = [judge_continuation(h, f, target, ids, settings.guards,
                                     nll_steered=None if math.isnan(a) else float(a),
                                     nll_base=None if math.isnan(b) else float(b) + nll_offset)
                  for h, f, a, b in zip(gens.heads, gens.fulls, nll_cont, reference_nll)]
    default = np.array([float(dm > 0 and j.is_target_head and j.fluent)
                        for dm, j in zip(gens.delta_m, judgements)])
    failures = default_failures(gens.delta_m, judgements, target, settings.guards)
    default, relevance_metrics = _relevance_guard(model, tokenizer, relevance, prompts, gens,
                                                  default, failures, settings)
    scores = sentence_scores(model, tokenizer, sentences, artifact,
                             batch_size=settings.batch_size, gamma=gamma)
    ci = lambda v: bootstrap_ci(v, n_boot=settings.n_boot, seed=settings.seed)  # noqa: E731
    text = summarise(judgements, n_boot=settings.n_boot, seed=settings.seed)
    metrics = {
        "default": wilson_ci(default),
        "delta_m": ci(gens.delta_m),
        "delta_m_gain": ci(gens.delta_m - reference.delta_m) if reference is not None
        else ci(np.zeros_like(gens.delta_m)),
        "default_failures": failures,
        "lid_head": text["is_target_head"], "lid_full": text["is_target_full"],
        "lid_first_line": text["is_target_first_line"], "fluent": text["fluent"],
        "looping": text["looping"], "leak": text["leak"], "leak_counts": text["leak_counts"],
        "script_fraction": text["script_fraction"], "distinct2": text["distinct2"],
        "continuation_nll_increase": ci(nll_cont - reference_nll),
        "nll_guard_offset": float(nll_offset),
        "kl_gen": ci(scores.kl["gen"]), "kl_all": ci(scores.kl["all"]),
        "nll_change_gen": ci(scores.nll["gen"] - scores.nll_base),
        "nll_change_all": ci(scores.nll["all"] - scores.nll_base),
        "nll_base": float(np.nanmean(scores.nll_base)),
        "n_prompts": len(prompts), "n_sentences": len(sentences),
        "seconds": time.perf_counter() - started,
        "examples": [{"prompt": p, "head": h, "continuation": f, "default": bool(d)}
                     for p, h, f, d in list(zip(prompts, gens.heads, gens.fulls, default))[:8]],
        **relevance_metrics,
    }
    return metrics, gens


def _relevance_guard(model, tokenizer, relevance, prompts, gens: Generations,
                     default: np.ndarray, failures: dict, settings: EvalSettings
                     ) -> tuple[np.ndarray, dict]:
    """DEFAULT with the relevance guard applied, and its metrics (none without a guard)."""
    if relevance is None:
        return default, {}
    pmi = relevance.pmi(model, tokenizer, prompts, gens.new_ids, settings.batch_size)
    relevant = relevance.passes(pmi)
    failures["relevance"] = float(1 - relevant.mean()) if len(relevant) else 0.0
    ci = lambda v: bootstrap_ci(v, n_boot=settings.n_boot, seed=settings.seed)  # noqa: E731
    return default * relevant, {"relevance": wilson_ci(relevant), "relevance_pmi": ci(pmi),
                                "relevance_tau": relevance.tau,
                                "relevance_calibration_answers": relevance.calibration_answers,
                                "default_without_relevance": wilson_ci(default)}


def language_nll_offset(model, tokenizer, target_text: Sequence[str] | HeldOutText,
                        english_text: Sequence[str] | HeldOutText, batch_size: int = 16
                        ) -> float:
    """Mean NLL/token of held-out target text minus that of English text, both under the
    unsteered model: how much more a fluent target-language text costs it than English (the
    NLL guard's language allowance, ``evaluation.nll_guard_language_offset``)."""
    nll = [float(np.nanmean(sentence_scores(model, tokenizer, text, None, modes=(),
                                            batch_size=batch_size).nll_base))
           for text in (target_text, english_text)]
    return nll[0] - nll[1]


FAILURE_REASONS = ("delta_m", "language", "looping", "script", "nll", "letters")


def default_failures(delta_m: np.ndarray, judgements, target: str,
                     guards: FluencyGuards) -> dict[str, float]:
    """Why continuations miss DEFAULT: the fraction of all continuations that fail each
    condition (not exclusive; a looping English answer counts under both): ``delta_m``
    (ΔM ≤ 0), ``language`` (the head is not identified as ``target`` at the confidence
    floor, guards aside) and each fluency guard (:func:`steering.evaluate.judge.failed_guards`)."""
    n = max(len(judgements), 1)
    counts = dict.fromkeys(FAILURE_REASONS, 0)
    for dm, j in zip(delta_m, judgements):
        counts["delta_m"] += int(not dm > 0)
        counts["language"] += int(not (j.lang_head == target
                                       and j.head_confidence >= guards.min_confidence))
        for name in j.failed_guards:
            counts[name] += 1
    return {k: v / n for k, v in counts.items()}


# --------------------------------------------------------------------------- tuning
@dataclass
class TuningPoint:
    lam: float
    beta: float
    delta_m: float
    kl: float
    within_budget: bool
    default: float | None = None  # objective="default" only: the guarded DEFAULT rate
    # With an NLL budget only: mean ΔNLL of the tuning sentences, and whether it is within.
    nll_change: float | None = None
    fluent: bool | None = None

    def to_dict(self) -> dict:
        out = {"lam": self.lam, "beta": self.beta, "delta_m": self.delta_m, "kl": self.kl,
               "within_budget": self.within_budget}
        for key in ("default", "nll_change", "fluent"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


TUNING_OBJECTIVES = ("delta_m", "default")


def guarded_passes(gens: Generations, target: str, identifiers, guards: FluencyGuards
                   ) -> np.ndarray:
    """Per continuation, 1.0 where ΔM > 0, the head is identified as ``target`` and every
    fluency guard but the NLL one passes (it needs the unsteered continuation's NLL), else 0.0."""
    js = [judge_continuation(h, f, target, identifiers, guards)
          for h, f in zip(gens.heads, gens.fulls)]
    return np.array([dm > 0 and j.is_target_head and j.fluent for dm, j in zip(gens.delta_m, js)],
                    dtype=float)


def guarded_default(gens: Generations, target: str, identifiers, guards: FluencyGuards,
                    relevant: np.ndarray | None = None) -> float:
    """Fraction of :func:`guarded_passes`; with ``relevant`` (one 0/1 per continuation: the
    relevance guard's verdict), also relevant."""
    ok = guarded_passes(gens, target, identifiers, guards)
    return float(np.mean(ok if relevant is None else ok * relevant))


def strength_grid(tuned: str, lams: Sequence[float], betas: Sequence[float]
                  ) -> list[tuple[float, float]]:
    """The (λ, β) points of a method's tuning grid: for each β, λ ascending (the order
    :func:`tune_strengths` walks them in)."""
    lams, betas = sorted(lams), sorted(betas)
    if tuned == "both":
        return [(l, b) for b in betas for l in lams]
    if tuned == "lam":
        return [(l, 0.0) for l in lams]
    if tuned == "beta":
        return [(0.0, b) for b in betas if b > 0]
    return []


def tune_strengths(model, tokenizer, artifact: SteeringArtifact, tuned: str, *,
                   prompts: Sequence[str], sentences: Sequence[str] | HeldOutText,
                   token_sets: LanguageTokenSets, kl_budget: float, lams: Sequence[float],
                   betas: Sequence[float], settings: EvalSettings,
                   stop_over_budget: bool = True, objective: str = "delta_m",
                   identifiers=None, relevance=None, nll_budget: float | None = None
                   ) -> tuple[SteeringArtifact, list[TuningPoint], bool]:
    """(λ, β) by maximum mean ΔM on tuning prompts subject to mean KL_gen ≤ ``kl_budget`` on
    tuning target sentences. Returns the tuned artifact, the grid points measured, and whether
    any point met the budget (if none did, the smallest-KL point is taken).

    ``objective="default"`` (a departure from DESIGN's "maximum ΔM"): each point also
    generates ``settings.max_new_tokens`` tokens and is ranked by :func:`guarded_default`
    (ties by ΔM), so a push that wins ΔM over the first T steps but then loops is not chosen.
    It costs a full-length decode per point instead of T steps. With ``relevance`` (a
    :class:`steering.evaluate.relevance.RelevanceCheck`) the rate also needs the relevance
    guard, as the reported DEFAULT does (one more teacher-forced scoring per point, of the
    answers that pass the other guards only: the rest fail DEFAULT whatever their relevance).

    ``stop_over_budget``: along λ at a fixed β (along β for a β-only method) the first point
    over the budget ends that line: the push only grows, and so does its KL (monotone in every
    demo sweep, docs/results.md), so the larger strengths could not be chosen. The smallest
    strength of each line is always measured, so the smallest-KL fallback is unchanged.

    ``nll_budget`` (nats/token): each point also records the mean ΔNLL of the tuning
    sentences (free: the KL's forward gives it) and :func:`best_point` prefers the points
    within both budgets that work (``tuning.nll_budget``)."""
    if objective not in TUNING_OBJECTIVES:
        raise ValueError(f"objective={objective!r}: use one of {TUNING_OBJECTIVES}")
    grid = strength_grid(tuned, lams, betas)
    if not grid:
        return artifact, [], True
    if objective == "default" and identifiers is None:
        identifiers = identifiers_for(artifact.target, artifact.english)
    points: list[TuningPoint] = []
    over_lines: set[float] = set()  # the β lines (λ lines for β-only) that went over
    for lam, beta in grid:
        line = lam if tuned == "beta" else beta
        if stop_over_budget and line in over_lines:
            continue
        cand = artifact.with_strengths(lam=lam, beta=beta, gamma=1.0)
        scores = sentence_scores(model, tokenizer, sentences, cand, modes=("gen",),
                                 batch_size=settings.batch_size)
        kl_mean = float(np.nanmean(scores.kl["gen"]))
        nll_change = (None if nll_budget is None
                      else float(np.nanmean(scores.nll["gen"] - scores.nll_base)))
        full = objective == "default"
        gens = generate(model, tokenizer, prompts, cand, token_sets, artifact.target,
                        artifact.english, settings,
                        max_new_tokens=settings.max_new_tokens if full else settings.steps)
        default = None
        if full:
            ok = guarded_passes(gens, artifact.target, identifiers, settings.guards)
            if relevance is not None:  # only the answers that pass the rest can count
                ok = ok * relevance.passes(relevance.pmi(
                    model, tokenizer, prompts, gens.new_ids, settings.batch_size,
                    rows=np.flatnonzero(ok)))
            default = float(ok.mean())
        points.append(TuningPoint(lam, beta, float(gens.delta_m.mean()), kl_mean,
                                  kl_mean <= kl_budget, default, nll_change,
                                  None if nll_budget is None else nll_change <= nll_budget))
        if not points[-1].within_budget:
            over_lines.add(line)
        log.info("  tune %s λ=%g β=%g: ΔM %+.4f, KL %.4f%s%s%s", artifact.method, lam, beta,
                 points[-1].delta_m, kl_mean, "" if default is None else f", DEFAULT {default:.2f}",
                 "" if nll_change is None else f", ΔNLL {nll_change:+.3f}",
                 "" if points[-1].within_budget else " (over)")
    best, ok = best_point(points, objective)
    return artifact.with_strengths(lam=best.lam, beta=best.beta, gamma=1.0), points, ok


def tuning_rank(objective: str):
    """The key a tuning point is ranked by within the budget (higher is better)."""
    if objective == "default":
        return lambda p: (p.default, p.delta_m)
    return lambda p: p.delta_m


def best_point(points: Sequence[TuningPoint], objective: str = "delta_m"
               ) -> tuple[TuningPoint, bool]:
    """The best point by ``objective`` among those within the budget, else the smallest-KL
    one; and whether any point met the budget. Points measured with an NLL budget
    (``fluent`` set): those within it that work (DEFAULT > 0 for the default objective, else
    ΔM > 0) are preferred among the points within the KL budget when there are any."""
    ok = [p for p in points if p.within_budget]
    if ok:
        def works(p: TuningPoint) -> bool:
            value = p.default if objective == "default" else p.delta_m
            return value is not None and value > 0

        preferred = [p for p in ok if p.fluent and works(p)]
        return max(preferred or ok, key=tuning_rank(objective)), True
    return min(points, key=lambda p: p.kl), False
