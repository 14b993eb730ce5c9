"""The corpus types every stage consumes: documents with language, split and pairing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

SPLITS = ("discovery", "tuning", "evaluation")


class CorpusError(ValueError):
    """Bad corpus input: empty, mismatched, missing language or column."""


@dataclass(frozen=True)
class Document:
    """One text to run through the model.

    ``pair_id`` links translations of the same sentence across languages (-1: unpaired text).
    """

    doc_id: int
    text: str
    language: str
    split: str
    pair_id: int = -1
    source: str = ""


@dataclass
class ParallelCorpus:
    """Aligned sentences: ``texts[lang][i]`` are translations of each other for every language.

    ``splits[i]`` is the fixed split of pair *i*; ``ids[i]`` a stable string id; ``topics`` optional.
    """

    texts: dict[str, list[str]]
    splits: list[str]
    ids: list[str]
    topics: list[str] = field(default_factory=list)
    name: str = "parallel"

    def __post_init__(self):
        if not self.texts:
            raise CorpusError(f"parallel corpus {self.name!r} has no languages")
        lengths = {lang: len(v) for lang, v in self.texts.items()}
        if len(set(lengths.values())) != 1:
            raise CorpusError(
                f"parallel corpus {self.name!r} has mismatched lengths per language: {lengths}; "
                "every language needs one sentence per pair"
            )
        n = next(iter(lengths.values()))
        if n == 0:
            raise CorpusError(f"parallel corpus {self.name!r} is empty (0 pairs)")
        if len(self.splits) != n or len(self.ids) != n:
            raise CorpusError(
                f"parallel corpus {self.name!r}: {n} pairs but {len(self.splits)} splits and "
                f"{len(self.ids)} ids"
            )
        bad = sorted(set(self.splits) - set(SPLITS))
        if bad:
            raise CorpusError(f"parallel corpus {self.name!r}: unknown splits {bad}; use {SPLITS}")
        for lang, texts in self.texts.items():
            empty = [i for i, t in enumerate(texts) if not t or not t.strip()]
            if empty:
                raise CorpusError(
                    f"parallel corpus {self.name!r}: language {lang!r} has {len(empty)} empty "
                    f"sentences (first at pair {empty[0]})"
                )

    @property
    def languages(self) -> list[str]:
        return list(self.texts)

    def __len__(self) -> int:
        return len(self.splits)

    def select(self, languages: list[str] | None = None, splits: list[str] | None = None):
        """A sub-corpus restricted to some languages and/or splits (languages must exist)."""
        if languages is not None:
            missing = [lang for lang in languages if lang not in self.texts]
            if missing:
                raise CorpusError(
                    f"language(s) {missing} missing from parallel corpus {self.name!r}; it has "
                    f"{self.languages}"
                )
        langs = languages if languages is not None else self.languages
        keep = [i for i, s in enumerate(self.splits) if splits is None or s in splits]
        if not keep:
            raise CorpusError(f"parallel corpus {self.name!r} has no pairs in splits {splits}")
        return ParallelCorpus(
            texts={lang: [self.texts[lang][i] for i in keep] for lang in langs},
            splits=[self.splits[i] for i in keep],
            ids=[self.ids[i] for i in keep],
            topics=[self.topics[i] for i in keep] if self.topics else [],
            name=self.name,
        )

    def to_documents(self, start_id: int = 0) -> list[Document]:
        """One document per (pair, language), pair-major so translations sit together."""
        docs = []
        for i in range(len(self)):
            for lang in self.languages:
                docs.append(Document(start_id + len(docs), self.texts[lang][i], lang,
                                     self.splits[i], pair_id=i, source=self.name))
        return docs

    def split_counts(self) -> dict[str, int]:
        return dict(Counter(self.splits))


def check_documents(docs: list[Document], name: str = "corpus") -> list[Document]:
    """Validate a document list before caching; returns it unchanged."""
    if not docs:
        raise CorpusError(f"{name} is empty: no documents to cache")
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        raise CorpusError(f"{name}: document ids are not unique")
    empty = [d.doc_id for d in docs if not d.text.strip()]
    if empty:
        raise CorpusError(f"{name}: {len(empty)} documents have empty text (first id {empty[0]})")
    bad = sorted({d.split for d in docs} - set(SPLITS))
    if bad:
        raise CorpusError(f"{name}: unknown splits {bad}; use {list(SPLITS)}")
    return docs
