"""What a learned steer learns from: the model's own native answers.

**Teacher answers.** For each discovery/tuning prompt that has a translation
(``sae_train/corpora/data/prompt_translations*.jsonl``), the unsteered model is asked in the
target language (translated prompt and template, :mod:`steering.evaluate.native`) with the headline
decoding; the answer is kept only when the harness's own judge accepts it (ΔM > 0, head
identified as the target, fluent). The pair (English prompt, native answer) is one training
example. Answers are generated once and cached as JSON next to the artifacts, keyed by
everything that shapes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from sae_train.corpora.embedded import Prompt, load_prompt_translations
from steering.language.defaultness import DEFAULT_TEMPLATE
from steering.steer.learned import LearnedSteerError, TeacherExample

log = logging.getLogger(__name__)


def teacher_answers(model, tokenizer, prompts: Sequence[Prompt], *, target: str, english: str,
                    native_template: str, token_sets, settings, identifiers,
                    cache_file: Optional[Path] = None, model_key: str = "", judge: bool = True
                    ) -> tuple[list[TeacherExample], dict]:
    """(examples, summary) for ``prompts`` (see the module docstring). ``settings`` is the
    harness's EvalSettings (decoding, length); its template is replaced by the native one.
    ``judge=False`` keeps every non-empty native answer (for models too small to pass the
    judge, e.g. the tiny test models)."""
    import dataclasses

    from steering.evaluate.harness import generate
    from steering.evaluate.judge import judge_continuation

    translations = load_prompt_translations(target)
    kept = [p for p in prompts if p.id in translations]
    key = hashlib.sha256(json.dumps(
        {"model": model_key, "target": target, "template": native_template,
         "ids": [p.id for p in kept], "texts": [translations[p.id] for p in kept],
         "max_new_tokens": settings.max_new_tokens, "steps": settings.steps,
         "repetition_penalty": settings.repetition_penalty, "judge": judge,
         "no_repeat_ngram_size": settings.no_repeat_ngram_size}, sort_keys=True).encode()
    ).hexdigest()[:16]
    if cache_file is not None and cache_file.is_file():
        stored = json.loads(cache_file.read_text())
        if stored.get("key") == key:
            return [TeacherExample(**e) for e in stored["examples"]], stored["summary"]
    if not kept:
        raise LearnedSteerError(f"no {target} translation of any of the {len(prompts)} "
                                "teacher prompts (prompt_translations*.jsonl)")
    native = dataclasses.replace(settings, template=native_template)
    gens = generate(model, tokenizer, [translations[p.id] for p in kept], None, token_sets,
                    target, english, native)
    examples, rejected = [], {}
    for p, new_ids, head, full, dm in zip(kept, gens.new_ids, gens.heads, gens.fulls,
                                          gens.delta_m):
        verdict = judge_continuation(head, full, target, identifiers, settings.guards)
        ok = len(new_ids) > 0 and (not judge or (dm > 0 and verdict.is_target_head
                                                  and verdict.fluent))
        if not ok:
            reason = "delta_m" if dm <= 0 else (verdict.failed_guards or ["language"])[0]
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        prompt_ids = tokenizer(DEFAULT_TEMPLATE.format(prompt=p.text))["input_ids"]
        examples.append(TeacherExample(p.id, list(prompt_ids), list(new_ids)))
    summary = {"asked": len(kept), "kept": len(examples), "rejected": rejected,
               "seconds": gens.seconds,
               "examples": [{"prompt": p.text, "native_answer": f}
                            for p, f in list(zip(kept, gens.fulls))[:4]]}
    log.info("teacher answers (%s): %d of %d native answers kept %s", target, len(examples),
             len(kept), rejected)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps({"key": key, "summary": summary,
                                          "examples": [e.__dict__ for e in examples]}))
    return examples, summary
