"""The native reference: the unsteered model *asked in the target language*.

A steer turns an English question into a target-language answer. The best it can hope for is
what the model does when the question itself is in the target language: the prompt translated
(``sae_train/corpora/data/prompt_translations.jsonl``) and the template too ("Pregunta: …
Respuesta:"). That row is scored by the same harness, decoding, judge and guards as every
method, so its DEFAULT is the ceiling the guards allow this model. It is not a baseline (it
changes the input, which a steer may not) and takes no part in the frontier comparison.

On the demo model (Gemma-3-270m base, 48 evaluation prompts, 24 new tokens) it measured es
0.92 and hi 0.77 (docs/results.md): the Hindi bar (0.90) is above what the model does in its
own Hindi, which loops or repeats the question.
"""

from __future__ import annotations

from typing import Optional, Sequence

from sae_train.corpora.embedded import Prompt, load_prompt_translations
from steering.language.defaultness import DEFAULT_TEMPLATE

# The English template (steering.language.defaultness.DEFAULT_TEMPLATE) in each language.
NATIVE_TEMPLATES = {
    "en": DEFAULT_TEMPLATE,
    "es": "Pregunta: {prompt}\nRespuesta:",
    "hi": "प्रश्न: {prompt}\nउत्तर:",
}


class NativeReferenceError(ValueError):
    """The native reference cannot be built (a bad template)."""


def native_template(target: str, template: Optional[str] = None) -> Optional[str]:
    """``template`` (checked) or the built-in one for ``target``; None when there is none."""
    if template is None:
        return NATIVE_TEMPLATES.get(target)
    if "{prompt}" not in template:
        raise NativeReferenceError(f"evaluation.native_template={template!r}: it must contain "
                                   "'{prompt}' where the translated question goes")
    return template


def native_prompts(prompts: Sequence[Prompt], target: str) -> tuple[list[str], list[str]]:
    """(translated texts, their ids) of the ``prompts`` that have a ``target`` translation,
    in order."""
    translations = load_prompt_translations(target)
    kept = [p for p in prompts if p.id in translations]
    return [translations[p.id] for p in kept], [p.id for p in kept]
