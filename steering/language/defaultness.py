"""Defaultness ΔM: how much next-token mass a model puts on the target language over English.

For a prompt x, greedy decoding gives contexts ctx_1 (the prompt) … ctx_T (prompt + the first
T-1 greedy tokens). With V_L a language token set (:mod:`steering.language.token_sets`)::

    M_t^L(x) = Σ_{u ∈ V_L} p(u | ctx_t)            (softmax of the step-t logits, float32)
    ΔM(x)    = (1/T) Σ_{t ≤ T} (M_t^tgt(x) − M_t^en(x))      T = ``steps``, default 3

Prompts are formatted with a template (base models: ``"Question: {prompt}\\nAnswer:"``),
tokenised with the tokenizer's special tokens (BOS), left-padded into batches with an attention
mask and position ids counted from each row's first real token, and stepped with the KV cache.
That costs ``steps`` forward passes per batch (the prompt, then one token per step) and gives the
same numbers as one prompt at a time with full forwards (tested).

``intervention`` lets a later stage measure ΔM under an edit: a zero-argument callable returning
a context manager, entered once around each batch's generation (so hooks can keep per-batch
state such as a decode-step counter).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
from transformers.generation.logits_process import (NoRepeatNGramLogitsProcessor,
                                                   RepetitionPenaltyLogitsProcessor)

from steering.language.head import HeadBypass, OutputHead
from steering.language.token_sets import LanguageTokenSets

DEFAULT_TEMPLATE = "Question: {prompt}\nAnswer:"


@dataclass
class DefaultnessResult:
    """Per-prompt ΔM and the per-step masses behind it (rows follow the input prompts)."""

    target: str
    english: str
    delta_m: torch.Tensor  # (n_prompts,) float32
    mass_target: torch.Tensor  # (n_prompts, steps) float32
    mass_english: torch.Tensor  # (n_prompts, steps) float32
    tokens: torch.Tensor  # (n_prompts, steps) long: the greedy token chosen at each step
    prompts: list[str]  # formatted prompts, as fed to the tokenizer

    @property
    def steps(self) -> int:
        return int(self.mass_target.shape[1])

    def mean(self) -> float:
        return float(self.delta_m.mean())

    def to_dict(self) -> dict:
        return {
            "target": self.target, "english": self.english, "steps": self.steps,
            "mean_delta_m": self.mean(), "delta_m": self.delta_m.tolist(),
            "mass_target": self.mass_target.tolist(), "mass_english": self.mass_english.tolist(),
            "tokens": self.tokens.tolist(), "prompts": self.prompts,
        }


def format_prompts(prompts: Sequence, template: str = DEFAULT_TEMPLATE) -> list[str]:
    """``template.format(prompt=…)`` for each prompt (strings or objects with ``.text``)."""
    if "{prompt}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{prompt}}' placeholder")
    return [template.format(prompt=getattr(p, "text", p)) for p in prompts]


def pad_token_id(tokenizer) -> int:
    """The id left padding fills with: the pad token, else EOS, else 0 (masked out anyway)."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def encode_prompts(tokenizer, prompts: Sequence, template: str = DEFAULT_TEMPLATE,
                   add_special_tokens: bool = True) -> tuple[list[str], list[list[int]]]:
    """(texts, token ids) of ``prompts`` formatted with ``template``; an error names a prompt
    that tokenises to nothing."""
    texts = format_prompts(prompts, template)
    if not texts:
        raise ValueError("no prompts given")
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    empty = [texts[i] for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompt {empty[0]!r} tokenises to nothing")
    return texts, encoded


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest), real tokens flush right."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, length - len(seq):] = 1
    return ids, mask


def _cache_keyword(model) -> str:
    """transformers ≥5.2x calls the KV cache argument ``cache``; earlier ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.inference_mode()
def greedy_language_masses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           set_ids: Sequence[torch.Tensor], steps: int,
                           repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                           rows_of: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy-decode ``steps`` tokens from a left-padded batch with the KV cache.

    Returns (masses ``(len(set_ids), batch, steps)``, tokens ``(batch, steps)``); masses[k]
    sums the float32 softmax over ``set_ids[k]`` at each step. ``repetition_penalty`` ≠ 1
    picks each token as ``generate(do_sample=False, repetition_penalty=...)`` does (every
    token already in the row, prompt included, has its logit divided by the penalty, or
    multiplied when negative); ``no_repeat_ngram_size`` = n > 0 never repeats an n-gram of the
    row, as ``generate(no_repeat_ngram_size=n)`` does (left padding included: the processor
    sees the padded rows exactly as generate() does). The masses stay the model's own
    distribution.

    ``rows_of`` (R,): the prompt pass fans the batch out into R rows, row r continuing prompt
    ``rows_of[r]`` (hooks that widen the batch inside the model, as
    :func:`steering.localise.lift.shared_prompt_edit` does); the result then has R rows.
    """
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty}: must be > 0 (1: off)")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size={no_repeat_ngram_size}: must be ≥ 0 (0: off)")
    # transformers' own processors, so the decode is generate()'s by construction; the
    # no-repeat ban alone takes a sparse path with the same result (_no_repeat_bans)
    processors = []
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    only_no_repeat = len(processors) == 1 and no_repeat_ngram_size > 0
    seen = input_ids if processors else None  # every id so far, per row
    # The vocabulary scored in chunks (HeadBypass + OutputHead.step_masses: no (rows × V)
    # logits, float copy or softmax; 2× per step on Gemma's 262k vocabulary), except under a
    # repetition penalty, whose processor needs every logit, or when something hooks the head.
    head = _chunkable_head(model) if not processors or only_no_repeat else None
    with HeadBypass(model) if head is not None else nullcontext() as bypass:
        return _greedy_steps(model, input_ids, attention_mask, set_ids, steps, processors,
                             no_repeat_ngram_size if only_no_repeat else 0, seen, rows_of,
                             head, bypass)


def _chunkable_head(model) -> OutputHead | None:
    """The head to score in chunks, or None where the model's own head call must run (not a
    plain Linear, or hooked: an intervention on the logits)."""
    return OutputHead.of(model) if HeadBypass.applies(model) else None


def _greedy_steps(model, input_ids, attention_mask, set_ids, steps, processors, no_repeat,
                  seen, rows_of, head, bypass):
    """The decode loop of :func:`greedy_language_masses`: with ``head`` (and its ``bypass``
    recording the final hidden states) each step is scored in vocabulary chunks, the
    no-repeat bans (``no_repeat`` > 0) applied inside; without, from the model's own logits
    through ``processors``."""
    device = input_ids.device
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1)
    if rows_of is not None:
        rows_of = rows_of.to(device)
        attention_mask, position_ids = attention_mask[rows_of], position_ids[rows_of]
        seen = None if seen is None else seen[rows_of]
    returned = (bypass.hidden if head is not None else out.logits).shape[0]
    if returned != attention_mask.shape[0]:
        raise ValueError(f"the prompt pass returned {returned} rows for "
                         f"{attention_mask.shape[0]}: pass rows_of when hooks widen the batch")
    vocab = head.weight.shape[0] if head is not None else out.logits.shape[-1]
    largest = max((int(ids.max()) for ids in set_ids if len(ids)), default=-1)
    if largest >= vocab:
        raise ValueError(f"token sets hold ids up to {largest}, but the model has only "
                         f"{vocab} logits: sets from another tokenizer?")
    if head is not None:
        set_mask = torch.zeros(vocab, len(set_ids), device=head.weight.device)
        for k, ids in enumerate(set_ids):
            set_mask[ids.to(set_mask.device), k] = 1.0
    masses = torch.zeros(len(set_ids), attention_mask.shape[0], steps, dtype=torch.float32)
    tokens = torch.zeros(attention_mask.shape[0], steps, dtype=torch.long)
    for step in range(steps):
        if head is not None:
            bans = _no_repeat_bans(seen, no_repeat, vocab) if no_repeat else None
            step_masses, chosen = head.step_masses(bypass.hidden[:, -1], set_mask,
                                                   banned=bans)
            masses[:, :, step] = step_masses.T.cpu()
        else:
            logits = out.logits[:, -1].float()
            probs = logits.softmax(-1)
            for k, ids in enumerate(set_ids):
                masses[k, :, step] = probs.index_select(-1, ids).sum(-1).cpu()
            scores = logits
            for process in processors:
                scores = process(seen, scores)  # each returns a new tensor
            chosen = scores.argmax(-1)
        if seen is not None:
            seen = torch.cat([seen, chosen[:, None].to(seen.device)], 1)
        chosen = chosen.to(device)
        tokens[:, step] = chosen.cpu()
        if step == steps - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(chosen), 1)], 1)
        position_ids = position_ids[:, -1:] + 1
        out = model(input_ids=chosen[:, None], attention_mask=attention_mask,
                    position_ids=position_ids, use_cache=True, logits_to_keep=1,
                    **{_cache_keyword(model): _returned_cache(out)})
    return masses, tokens


def _no_repeat_bans(seen: torch.Tensor, n: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, ids) that ``NoRepeatNGramLogitsProcessor(n)`` sets to −inf after ``seen``: a
    token is banned where a window of the row starts with the row's last n − 1 tokens and ends
    in it (ids past the logits cannot be generated and are left out)."""
    length = seen.shape[1]
    if length < n:
        empty = seen.new_zeros(0)
        return empty, empty
    windows = seen.unfold(1, n, 1)  # (B, W, n)
    matches = (windows[..., :-1] == seen[:, length + 1 - n:][:, None]).all(-1)
    matches &= windows[..., -1] < vocab
    rows, which = matches.nonzero(as_tuple=True)
    return rows, windows[rows, which, -1]


def defaultness(model, tokenizer, prompts: Sequence, token_sets: LanguageTokenSets,
                target: str, *, english: str = "en", steps: int = 3, batch_size: int = 16,
                template: str = DEFAULT_TEMPLATE,
                intervention: Callable[[], ContextManager] | None = None,
                add_special_tokens: bool = True) -> DefaultnessResult:
    """ΔM of ``target`` over ``english`` for each prompt over the first ``steps`` greedy steps.

    ``prompts``: strings or objects with ``.text`` (e.g. ``load_embedded_prompts()``), formatted
    with ``template``. ``intervention``: zero-argument callable returning a context manager,
    entered around each batch (``None``: the unmodified model).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be ≥ 1 (got {steps}, {batch_size})")
    if target == english:
        raise ValueError(f"target and english are both {target!r}; ΔM would be 0")
    texts, encoded = encode_prompts(tokenizer, prompts, template, add_special_tokens)
    device = next(model.parameters()).device
    set_ids = [token_sets.id_tensor(target, device), token_sets.id_tensor(english, device)]
    pad_id = pad_token_id(tokenizer)
    mass_chunks, token_chunks = [], []
    for start in range(0, len(texts), batch_size):
        input_ids, attention_mask = left_pad(encoded[start:start + batch_size], pad_id)
        with intervention() if intervention is not None else nullcontext():
            masses, tokens = greedy_language_masses(model, input_ids.to(device),
                                                    attention_mask.to(device), set_ids, steps)
        mass_chunks.append(masses)
        token_chunks.append(tokens)
    masses = torch.cat(mass_chunks, dim=1)
    return DefaultnessResult(
        target=target, english=english, delta_m=(masses[0] - masses[1]).mean(-1),
        mass_target=masses[0], mass_english=masses[1], tokens=torch.cat(token_chunks),
        prompts=texts,
    )
