"""Language token sets on both tokenizer families, trained in-process on the embedded corpus."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from sae_train.corpora.embedded import load_embedded_corpus
from sae_train.models.tiny import tiny_training_texts, train_byte_level_bpe, train_sentencepiece
from steering.language.token_sets import (LanguageTokenSets, TokenSetError,
                                          build_language_token_sets, decode_vocabulary)

LANGS = ("en", "es", "hi")


@pytest.fixture(scope="module", params=["byte_level_bpe", "sentencepiece"])
def family(request, tmp_path_factory):
    """(tokenizer, token sets, decoded vocabulary) for one tokenizer family."""
    texts = tiny_training_texts()
    if request.param == "byte_level_bpe":
        tokenizer = train_byte_level_bpe(texts, vocab_size=1024)
    else:
        tokenizer = train_sentencepiece(texts, tmp_path_factory.mktemp("spm"), vocab_size=1024)
    corpus = load_embedded_corpus(splits=["discovery"])
    sets = build_language_token_sets(tokenizer, {lang: corpus.texts[lang] for lang in LANGS},
                                     LANGS)
    return tokenizer, sets, decode_vocabulary(tokenizer)


def single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def test_english_words_with_and_without_the_space_marker_are_english(family):
    tokenizer, sets, _ = family
    found = {w: single_token(tokenizer, w) for w in ("the", " the", "The", " and", " of")}
    assert found[" the"] is not None and found["The"] is not None
    for word, tid in found.items():
        if tid is not None:
            assert ("en", tid) in sets and ("es", tid) not in sets, word


def test_spanish_function_words_are_spanish_not_english(family):
    tokenizer, sets, _ = family
    found = {w: single_token(tokenizer, w) for w in (" el", " la", " que", " de", " los", " y",
                                                     " en", "el", "que")}
    present = [w for w, tid in found.items() if tid is not None and w.startswith(" ")]
    assert len(present) >= 5, found
    for word in present:
        tid = found[word]
        assert ("es", tid) in sets and ("en", tid) not in sets, word
    for word in ("el", "que"):  # without the marker they may be English sub-words: never English
        if found[word] is not None:
            assert ("en", found[word]) not in sets


def test_devanagari_is_hindi_although_raw_strings_are_mojibake(family):
    tokenizer, sets, decoded = family
    hi = sets.ids("hi")
    assert len(hi) >= 100
    # every member decodes to Devanagari letters (raw byte-level strings do not)
    assert all(any("\u0900" <= c <= "\u097f" for c in decoded[i]) for i in hi)
    for word in ("की", " है", " में"):
        ids = tokenizer.encode(word, add_special_tokens=False)
        assert all(("hi", i) in sets for i in ids if decoded[i].strip()), (word, ids)
    # nearly all of a Hindi text's tokens are in V_hi: the rest are spaces and punctuation
    text = " ".join(load_embedded_corpus(splits=["evaluation"]).texts["hi"][:50])
    ids = tokenizer.encode(text, add_special_tokens=False)
    with_letters = [i for i in ids if any(unicodedata.category(c)[0] in "LM" for c in decoded[i])]
    in_hi = np.mean([("hi", i) in sets for i in with_letters])
    assert in_hi > 0.97, in_hi


def test_digits_punctuation_whitespace_and_special_tokens_belong_to_no_language(family):
    tokenizer, sets, decoded = family
    no_letters = [i for i, s in enumerate(decoded)  # no letter, mark (matra) or partial byte
                  if not any(unicodedata.category(c)[0] in "LM" or c == "\ufffd" for c in s)]
    assert len(no_letters) >= 40
    assert (sets.labels[no_letters] == -1).all(), [decoded[i] for i in no_letters
                                                   if sets.labels[i] >= 0][:10]
    for text in ("2024", " 12.5%", ",", ".", "?!", "  ", "\n", "\t", "।", "(3)"):
        for i in tokenizer.encode(text, add_special_tokens=False):
            assert sets.labels[i] == -1, (text, decoded[i])
    for i in tokenizer.all_special_ids:
        assert sets.labels[i] == -1


def test_partial_utf8_byte_tokens_belong_to_no_language(family):
    _, sets, decoded = family
    partial = [i for i, s in enumerate(decoded) if s and set(s) <= {"\ufffd", " "}]
    assert len(partial) >= 64  # byte tokens 0x80–0xFF (byte-level BPE) / <0x80>… (byte fallback)
    assert (sets.labels[partial] == -1).all()
    assert sets.reason_counts()["partial_utf8"] >= 64


def test_sets_are_disjoint_sorted_and_masks_agree(family):
    tokenizer, sets, _ = family
    masks = np.stack([sets.mask(lang).numpy() for lang in LANGS])
    assert masks.sum(0).max() == 1
    for k, lang in enumerate(LANGS):
        ids = sets.ids(lang)
        assert (np.diff(ids) > 0).all()
        assert sets.sizes[lang] == len(ids) == masks[k].sum() > 50
    wide = sets.mask("es", size=len(tokenizer) + 7)
    assert wide.shape[0] == len(tokenizer) + 7 and not wide[len(tokenizer):].any()


def test_json_report_and_round_trip(family, tmp_path):
    _, sets, _ = family
    report = sets.to_json(tmp_path / "sets.json", include_ids=True)
    assert report["sizes"] == sets.sizes
    assert report["rule"]["ratio"] == 3.0 and report["rule"]["min_count"] == 3
    assert " the" in report["examples"]["en"][:5]
    assert " de" in report["examples"]["es"][:5]
    assert all(any("\u0900" <= c <= "\u097f" for c in t) for t in report["examples"]["hi"])
    assert report["by_source"]["hi"]["script"] == sets.sizes["hi"]
    again = LanguageTokenSets.from_json(tmp_path / "sets.json")
    np.testing.assert_array_equal(again.labels, sets.labels)


def test_rival_languages_in_the_corpus_keep_their_tokens_out(family):
    tokenizer, _, _ = family
    corpus = load_embedded_corpus(splits=["discovery"])
    only_es = build_language_token_sets(tokenizer, {lang: corpus.texts[lang] for lang in LANGS},
                                        ["es"], use_wordfreq=False)
    the = single_token(tokenizer, " the")
    assert the not in set(only_es.ids("es").tolist())
    assert single_token(tokenizer, " de") in set(only_es.ids("es").tolist())
    assert only_es.reasons[the] == 5  # contrast_language: English won it


def test_empty_set_names_the_language_and_tokenizer(family):
    tokenizer, _, _ = family
    corpus = load_embedded_corpus(splits=["discovery"])
    with pytest.raises(TokenSetError, match=r"'ja'.*" + type(tokenizer).__name__):
        build_language_token_sets(tokenizer, {lang: corpus.texts[lang] for lang in ("en", "es")},
                                  ["en", "ja"])
    with pytest.raises(TokenSetError, match="no script known"):
        build_language_token_sets(tokenizer, {"en": corpus.texts["en"]}, ["en", "xx"])


def test_english_needs_a_latin_rival_and_wordfreq_rivals_supply_one(family):
    tokenizer, _, _ = family
    corpus = load_embedded_corpus(splits=["discovery"])
    en_hi = {lang: corpus.texts[lang] for lang in ("en", "hi")}
    with pytest.raises(TokenSetError, match=r"'en'.*rival"):
        build_language_token_sets(tokenizer, en_hi, ["en", "hi"])
    sets = build_language_token_sets(tokenizer, en_hi, ["en", "hi"], rivals=["es"])
    assert ("en", single_token(tokenizer, " the")) in sets
    for word in (" de", " que", " el", " la"):
        assert ("en", single_token(tokenizer, word)) not in sets, word
    assert sets.sizes["hi"] >= 100 and sets.rule["rivals_only"] == ["es"]
    with pytest.raises(TokenSetError, match=r"\['mr'\].*neither corpus texts nor a wordfreq"):
        build_language_token_sets(tokenizer, en_hi, ["en", "hi"], rivals=["es", "mr"])
