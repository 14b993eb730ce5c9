"""The corpus that ships inside the package.

Written for this project (original sentences, released with the code under its license):
``data/parallel_*.jsonl`` holds English sentences with Spanish and Hindi (Devanagari) translations
over 15 everyday topics, each pair with a fixed split; ``data/prompts_*.jsonl`` holds neutral
English prompts ("Explain how rain forms."), also split; ``data/prompt_translations.jsonl``
holds Spanish and Hindi translations of every evaluation prompt (the steering harness's
"native" reference: the unsteered model asked in the target language). Split rule (fixed, by index within a
topic): sentences 3:1:1 discovery/tuning/evaluation; prompts 2:1:2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

from sae_train.corpora.types import SPLITS, CorpusError, Document, ParallelCorpus

EMBEDDED_LANGUAGES = ("en", "es", "hi")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    split: str
    topic: str


def _read_jsonl(pattern: str) -> list[dict]:
    data_dir = files("sae_train.corpora").joinpath("data")
    rows = []
    for entry in sorted(data_dir.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(pattern) and entry.name.endswith(".jsonl"):
            for line in entry.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rows.append(json.loads(line))
    return rows


@lru_cache(maxsize=1)
def _parallel_rows() -> tuple[dict, ...]:
    rows = _read_jsonl("parallel_")
    if not rows:
        raise CorpusError("the embedded parallel corpus is missing from the installed package")
    return tuple(rows)


def load_embedded_corpus(languages: list[str] | None = None,
                         splits: list[str] | None = None) -> ParallelCorpus:
    """The embedded en/es/hi parallel corpus, optionally restricted to languages and splits."""
    rows = _parallel_rows()
    corpus = ParallelCorpus(
        texts={lang: [r[lang] for r in rows] for lang in EMBEDDED_LANGUAGES},
        splits=[r["split"] for r in rows],
        ids=[r["id"] for r in rows],
        topics=[r["topic"] for r in rows],
        name="embedded",
    )
    if languages is None and splits is None:
        return corpus
    return corpus.select(languages=languages, splits=splits)


def load_embedded_prompts(splits: list[str] | None = None) -> list[Prompt]:
    """Neutral English prompts, optionally only some splits."""
    bad = sorted(set(splits or []) - set(SPLITS))
    if bad:
        raise CorpusError(f"unknown prompt splits {bad}; use {list(SPLITS)}")
    prompts = [Prompt(r["id"], r["text"], r["split"], r.get("topic", ""))
               for r in _read_jsonl("prompts_")]
    return [p for p in prompts if splits is None or p.split in splits]


@lru_cache(maxsize=1)
def _translation_rows() -> tuple[dict, ...]:
    return tuple(_read_jsonl("prompt_translations"))


def load_prompt_translations(language: str) -> dict[str, str]:
    """Prompt id → the prompt translated into ``language`` (the evaluation prompts; empty
    for a language without translations)."""
    return {r["id"]: r[language] for r in _translation_rows() if r.get(language)}


def embedded_documents(languages: list[str] | None = None, splits: list[str] | None = None,
                       include_prompts: bool = True) -> list[Document]:
    """Documents for caching: every (pair, language), then the prompts as unpaired English."""
    docs = load_embedded_corpus(languages, splits).to_documents()
    if include_prompts and (languages is None or "en" in languages):
        for p in load_embedded_prompts(splits):
            docs.append(Document(len(docs), p.text, "en", p.split, pair_id=-1,
                                 source="embedded-prompts"))
    return docs
