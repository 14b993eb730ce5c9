"""Corpora: the embedded parallel corpus and loaders for what users bring."""

from __future__ import annotations

from sae_train.corpora.types import (SPLITS, CorpusError, Document, ParallelCorpus,
                                     check_documents)


def load_documents(cfg) -> list:
    """Documents to cache for a ``DataConfig`` (embedded, parallel or text)."""
    from sae_train.corpora import loaders
    from sae_train.corpora.embedded import embedded_documents

    if cfg.kind == "embedded":
        docs = embedded_documents(list(cfg.languages), cfg.splits, cfg.include_prompts)
    elif cfg.kind == "parallel":
        docs = loaders.load_parallel_dataset(cfg).to_documents()
    elif cfg.kind == "text":
        docs = loaders.load_text_dataset(cfg)
    else:
        raise CorpusError(f"data.kind={cfg.kind!r} is not one of embedded, parallel, text")
    return check_documents(docs, name=f"data {cfg.name!r}")


__all__ = ["SPLITS", "CorpusError", "Document", "ParallelCorpus", "check_documents",
           "load_documents"]
