"""The embedded corpus meets its contract, and bad corpus input fails with a clear message."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from sae_train.config import DataConfig
from sae_train.corpora import load_documents
from sae_train.corpora.embedded import (embedded_documents, load_embedded_corpus,
                                        load_embedded_prompts)
from sae_train.corpora.types import CorpusError, Document, ParallelCorpus, check_documents

DEVANAGARI = re.compile(r"[\u0900-\u097F]")


def test_embedded_parallel_corpus_contract():
    corpus = load_embedded_corpus()
    assert corpus.languages == ["en", "es", "hi"]
    assert len(corpus) >= 600
    assert len(set(corpus.ids)) == len(corpus)
    assert len(set(corpus.topics)) >= 12
    counts = corpus.split_counts()
    assert set(counts) == {"discovery", "tuning", "evaluation"}
    assert counts["discovery"] > counts["tuning"] > 100 and counts["evaluation"] > 100
    for lang in corpus.languages:
        texts = corpus.texts[lang]
        assert len(set(texts)) == len(texts), f"duplicate {lang} sentences"
        for text in texts:
            assert 5 <= len(text.split()) <= 30, (lang, text)
    for text in corpus.texts["hi"]:
        letters = [c for c in text if c.isalpha()]
        assert not re.search(r"[A-Za-z]", text), text
        assert sum(bool(DEVANAGARI.match(c)) for c in letters) / len(letters) > 0.8, text
    assert not any(DEVANAGARI.search(t) for t in corpus.texts["es"] + corpus.texts["en"])
    # Spanish is Spanish: accents/ñ/¿ appear throughout, and common function words dominate.
    es_words = Counter(w.lower().strip("¿?¡!.,") for t in corpus.texts["es"] for w in t.split())
    assert {"el", "la", "de", "que", "en"} <= {w for w, _ in es_words.most_common(20)}


def test_embedded_prompts_contract():
    prompts = load_embedded_prompts()
    assert len(prompts) >= 300
    assert len({p.text for p in prompts}) == len(prompts)
    assert Counter(p.split for p in prompts).keys() == {"discovery", "tuning", "evaluation"}
    banned = re.compile(r"\b(spanish|hindi|english|language|translat\w*|india|spain|mexico)\b",
                        re.I)
    assert not [p.text for p in prompts if banned.search(p.text)]
    assert [p.id for p in load_embedded_prompts(["tuning"])] == \
        [p.id for p in prompts if p.split == "tuning"]


def test_documents_pair_translations_and_respect_filters():
    docs = embedded_documents(languages=["en", "hi"], splits=["evaluation"], include_prompts=False)
    assert {d.language for d in docs} == {"en", "hi"} and {d.split for d in docs} == {"evaluation"}
    by_pair = Counter(d.pair_id for d in docs)
    assert set(by_pair.values()) == {2}
    cfg = DataConfig(kind="embedded", languages=["es"], splits=["tuning"], include_prompts=True)
    docs = load_documents(cfg)
    assert {d.language for d in docs} == {"es"}  # prompts are English: not included for [es]
    assert [d.doc_id for d in docs] == list(range(len(docs)))


def test_corpus_errors_are_clear():
    with pytest.raises(CorpusError, match="mismatched lengths per language: {'en': 2, 'es': 1}"):
        ParallelCorpus(texts={"en": ["a b", "c d"], "es": ["x y"]}, splits=["tuning"] * 2,
                       ids=["1", "2"])
    with pytest.raises(CorpusError, match="is empty"):
        ParallelCorpus(texts={"en": [], "es": []}, splits=[], ids=[])
    with pytest.raises(CorpusError, match=r"language\(s\) \['fr'\] missing .* has \['en', 'es', 'hi'\]"):
        load_embedded_corpus(languages=["en", "fr"])
    with pytest.raises(CorpusError, match="is empty: no documents"):
        check_documents([], name="data 'mine'")
    with pytest.raises(CorpusError, match="unknown splits \\['train'\\]"):
        check_documents([Document(0, "hello there", "en", "train")])
    with pytest.raises(CorpusError, match="data.kind='wiki' is not one of"):
        load_documents(DataConfig(kind="wiki"))


def test_every_prompt_has_spanish_and_hindi_translations():
    """Every prompt of every split (evaluation: the native row; discovery and tuning: the
    learned steers' teacher answers and the relevance guard's calibration)."""
    from sae_train.corpora.embedded import load_prompt_translations

    evaluation = {p.id: p.text for p in load_embedded_prompts()}
    es, hi = load_prompt_translations("es"), load_prompt_translations("hi")
    assert set(es) == set(hi) == set(evaluation)
    assert load_prompt_translations("fr") == {}
    for pid, text in es.items():
        assert text != evaluation[pid] and not DEVANAGARI.search(text), (pid, text)
        assert 2 <= len(text.split()) <= 3 * len(evaluation[pid].split()), (pid, text)
    for pid, text in hi.items():
        letters = [c for c in text if c.isalpha()]
        assert not re.search(r"[A-Za-z]", text), (pid, text)
        assert sum(bool(DEVANAGARI.match(c)) for c in letters) / len(letters) > 0.9, (pid, text)
    assert len(set(es.values())) == len(es) and len(set(hi.values())) == len(hi)
