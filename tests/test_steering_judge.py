"""Text-level judgement: scripts, language ID, looping, fluency guards, leakage, bootstrap CIs."""

from __future__ import annotations

import math

import pytest

from steering.evaluate.judge import (CONFUSABLE, SCRIPTS, FluencyGuards, Judgement,
                                     LanguageIdentifier, bootstrap_ci, count_letters, distinct_n,
                                     first_line, identifiers_for, is_looping, judge_continuation,
                                     longest_tandem_repeat, looping_reason, max_ngram_share,
                                     script_fraction, summarise, wilson_ci)

SPANISH = "La capital de Francia es París, una ciudad muy bonita y llena de historia."
ENGLISH = "The capital of France is Paris, a beautiful city full of history and art."
PORTUGUESE = "Muito obrigado! Você não precisa se preocupar, está tudo bem, não é?"
HINDI = "भारत की राजधानी नई दिल्ली है। यह एक बहुत बड़ा और सुंदर शहर है।"


@pytest.fixture(scope="module")
def es_ids():
    return identifiers_for("es")


@pytest.fixture(scope="module")
def hi_ids():
    return identifiers_for("hi")


# --------------------------------------------------------------------------- scripts
def test_script_fraction_pure_and_mixed():
    assert script_fraction("नमस्ते दुनिया", "Devanagari") == 1.0
    assert script_fraction("नमस्ते दुनिया", "Latin") == 0.0
    assert script_fraction("¿Qué tal, señor?", "Latin") == 1.0
    # "hola" = 4 letters; "नमस्ते" = न म स ् त े = 6 letters (virama and matra count)
    assert script_fraction("hola नमस्ते", "Devanagari") == pytest.approx(6 / 10)
    assert script_fraction("hola नमस्ते", "hi") == pytest.approx(0.6)  # language code accepted
    assert script_fraction("hola नमस्ते", "es") == pytest.approx(0.4)
    assert script_fraction("123 -- !!", "Latin") == 0.0
    assert script_fraction("", "Devanagari") == 0.0


def test_combining_marks_count_as_letters_but_inherited_marks_are_neutral():
    assert count_letters("कि") == 2  # consonant + vowel sign i (Mc, not isalpha)
    assert count_letters("क्ष") == 3
    assert count_letters("e\u0301") == 1  # decomposed é: the acute accent is Inherited
    assert count_letters("a1-b\n") == 2


def test_script_table_and_unknown_script():
    assert SCRIPTS["hi"] == SCRIPTS["mr"] == SCRIPTS["ne"] == "Devanagari"
    assert SCRIPTS["ur"] == "Arabic" and SCRIPTS["es"] == SCRIPTS["gl"] == "Latin"
    assert script_fraction("میرا نام احمد ہے", "ur") == 1.0
    with pytest.raises(ValueError, match="Klingon"):
        script_fraction("abc", "Klingon")
    assert CONFUSABLE["es"] == ["pt", "it", "ca", "gl"] and CONFUSABLE["hi"] == ["mr", "ne", "ur"]


# --------------------------------------------------------------------------- language ID
def test_restricted_identifier_tells_spanish_from_english(es_ids):
    main, _ = es_ids
    assert main.languages == ("es", "en")
    lang, conf = main.identify(SPANISH)
    assert lang == "es" and conf > 0.99
    lang, conf = main.identify(ENGLISH)
    assert lang == "en" and conf > 0.99
    assert main.identify("-\n-\n") == (None, 0.0)
    assert main.identify("ok") == (None, 0.0)  # 2 letters < min_letters


def test_identifiers_are_independent_instances(es_ids, hi_ids):
    main_es, leak_es = es_ids
    main_hi, _ = hi_ids
    assert leak_es.languages == ("es", "en", "pt", "it", "ca", "gl")
    assert main_hi.identify(HINDI)[0] == "hi"
    assert main_es.identify(SPANISH)[0] == "es"  # hi's restriction did not leak into es's
    assert leak_es.identify(PORTUGUESE)[0] == "pt"
    assert main_es.identify(PORTUGUESE)[0] == "es"  # pt is not among main's languages
    ranked = leak_es.rank(SPANISH)
    assert [lang for lang, _ in ranked][0] == "es" and len(ranked) == 6
    assert sum(p for _, p in ranked) == pytest.approx(1.0, abs=1e-4)


def test_unsupported_language_is_named():
    with pytest.raises(ValueError, match="xx"):
        LanguageIdentifier(["es", "xx"])
    with pytest.raises(ValueError):
        LanguageIdentifier([])
    with pytest.raises(ValueError):
        identifiers_for("en")


# --------------------------------------------------------------------------- repetition
def test_distinct_n_and_shares():
    assert distinct_n("el el el el el el el el el") == pytest.approx(1 / 8)
    assert distinct_n("a b c d") == 1.0
    assert distinct_n("solo") == 1.0  # fewer than n tokens
    assert distinct_n("El el, EL. el") == pytest.approx(1 / 3)  # case and edge punctuation
    assert max_ngram_share("a a a b") == pytest.approx(0.75)
    assert max_ngram_share("a b a b", n=2) == pytest.approx(2 / 3)
    assert max_ngram_share("") == 0.0
    assert longest_tandem_repeat(["x", "de", "la", "de", "la", "de", "la", "y"]) == (2, 3)
    assert longest_tandem_repeat(["a", "b", "c"]) == (0, 0)


def test_looping_detection():
    assert looping_reason("el el el el el el el el el") == "distinct2"
    assert is_looping(" ".join(["नमस्ते"] * 9))
    word_share = "राम और सीता और लक्ष्मण और हनुमान और भरत और"  # "और" is 5 of 10 words
    assert distinct_n(word_share) >= 0.5 and looping_reason(word_share) == "word_share"
    assert looping_reason("de la de la de la") == "tandem"
    assert looping_reason("नमस्ते" * 6) == "chars"  # no spaces: character rule
    assert not is_looping(SPANISH) and not is_looping(HINDI) and not is_looping(ENGLISH)
    assert not is_looping("no no no")  # emphasis, not a loop
    assert not is_looping("-\n-\n")


def test_first_line():
    assert first_line("\n\n  Hola mundo  \nsegunda") == "Hola mundo"
    assert first_line("\n \n") == ""


# --------------------------------------------------------------------------- judgement
def test_fluent_spanish_counts_as_target(es_ids):
    j = judge_continuation(SPANISH[:40], SPANISH, "es", es_ids, nll_steered=2.3, nll_base=2.0)
    assert j.fluent and j.failed_guards == []
    assert j.is_target_head and j.is_target_full and j.is_target_first_line
    assert j.lang_head == "es" and j.head_confidence > 0.9
    assert j.leak is None and not j.looping
    assert j.nll_increase == pytest.approx(0.3)
    assert j.distinct2 == 1.0 and j.script_fraction == 1.0
    d = j.to_dict()
    assert d["is_target_head"] is True and d["lang_full"] == "es" and isinstance(j, Judgement)


def test_english_continuation_is_not_spanish(es_ids):
    j = judge_continuation(ENGLISH[:40], ENGLISH, "es", es_ids)
    assert j.fluent and j.lang_head == "en" and j.lang_full == "en"
    assert not (j.is_target_head or j.is_target_full or j.is_target_first_line)


def test_starting_in_english_is_not_a_target_first_line(es_ids):
    full = "Sure, here is the answer to your question.\n" + SPANISH
    j = judge_continuation(full[:40], full, "es", es_ids)
    assert j.lang_first_line == "en" and not j.is_target_first_line and not j.is_target_head


@pytest.mark.parametrize("junk", ["-\n-\n", "\nUCI\nLarver"])
def test_facts_traps_are_not_fluent_target_text(es_ids, hi_ids, junk):
    for target, ids in (("es", es_ids), ("hi", hi_ids)):
        j = judge_continuation(junk, junk, target, ids)
        assert not (j.is_target_head or j.is_target_full or j.is_target_first_line), (target, j)
    j = judge_continuation("-\n-\n", "-\n-\n", "hi", hi_ids)
    assert j.lang_head is None and not j.fluent and "letters" in j.failed_guards
    assert "script" in j.failed_guards
    j = judge_continuation("\nUCI\nLarver", "\nUCI\nLarver", "es", es_ids)
    # py3langid does say "es" here, but at ~0.5 against English: below min_confidence
    assert j.lang_head == "es" and j.head_confidence < FluencyGuards().min_confidence


def test_looping_spanish_is_not_target(es_ids):
    text = "el el el el el el el el el"
    j = judge_continuation(text, text, "es", es_ids)
    assert j.lang_head == "es"  # language ID alone would accept it
    assert j.looping and not j.fluent and not j.is_target_head and j.distinct2 < 0.5


def test_hindi_target_script_guard(hi_ids):
    j = judge_continuation(HINDI[:30], HINDI, "hi", hi_ids)
    assert j.is_target_head and j.is_target_full and j.script_fraction == 1.0
    latin = "Bharat ki rajdhani Nai Dilli hai. Yah ek bahut bada aur sundar shahar hai."
    j = judge_continuation(latin, latin, "hi", hi_ids)
    assert j.script_fraction == 0.0 and "script" in j.failed_guards and not j.is_target_head
    # the script guard alone: mostly Latin text that language ID calls Hindi is still rejected
    mixed = HINDI + " " + ENGLISH + " " + ENGLISH
    j = judge_continuation(HINDI, mixed, "hi", hi_ids)
    assert j.lang_head == "hi" and j.script_fraction < 0.8
    assert j.failed_guards == ["script"] and not j.is_target_head
    relaxed = FluencyGuards(min_script_fraction=0.2)
    assert judge_continuation(HINDI, mixed, "hi", hi_ids, relaxed).is_target_head


def test_nll_guard(es_ids):
    ok = judge_continuation(SPANISH, SPANISH, "es", es_ids, nll_steered=3.0, nll_base=2.5)
    assert ok.is_target_head
    bad = judge_continuation(SPANISH, SPANISH, "es", es_ids, nll_steered=3.6, nll_base=2.5)
    assert bad.failed_guards == ["nll"] and not bad.fluent and not bad.is_target_head
    assert bad.nll_increase == pytest.approx(1.1)
    one = judge_continuation(SPANISH, SPANISH, "es", es_ids, nll_steered=9.0, nll_base=None)
    assert one.is_target_head and one.nll_increase is None  # guard needs both numbers
    off = judge_continuation(SPANISH, SPANISH, "es", es_ids, FluencyGuards(max_nll_increase=None),
                             nll_steered=9.0, nll_base=2.0)
    assert off.is_target_head


def test_portuguese_leaks_for_spanish_target(es_ids):
    j = judge_continuation(PORTUGUESE, PORTUGUESE, "es", es_ids)
    assert j.leak == "pt" and j.leak_confidence > 0.9
    spanish = judge_continuation(SPANISH, SPANISH, "es", es_ids)
    assert spanish.leak is None
    main_only = judge_continuation(PORTUGUESE, PORTUGUESE, "es", es_ids[0])
    assert main_only.leak is None  # no leak identifier given


def test_marathi_leaks_for_hindi_target(hi_ids):
    marathi = "माझे नाव राहुल आहे आणि मी पुण्यात राहतो. मला पुस्तके वाचायला आवडतात."
    j = judge_continuation(marathi, marathi, "hi", hi_ids)
    assert j.leak == "mr"
    assert judge_continuation(HINDI, HINDI, "hi", hi_ids).leak is None


def test_identifier_must_know_the_target(es_ids):
    with pytest.raises(ValueError, match="hi"):
        judge_continuation(SPANISH, SPANISH, "hi", es_ids)


# --------------------------------------------------------------------------- statistics
def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]
    a = bootstrap_ci(values, seed=3)
    assert a["n"] == 10 and a["mean"] == pytest.approx(0.7)
    assert a["low"] < 0.7 < a["high"] and 0.0 <= a["low"] and a["high"] <= 1.0
    assert bootstrap_ci(values, seed=3) == a
    spread = [0.1 * i ** 1.5 for i in range(30)]
    assert bootstrap_ci(spread, seed=4) == bootstrap_ci(spread, seed=4)
    assert bootstrap_ci(spread, seed=4)["low"] != bootstrap_ci(spread, seed=5)["low"]


def test_bootstrap_ci_narrows_with_more_data():
    small = bootstrap_ci([1, 0] * 10)
    large = bootstrap_ci([1, 0] * 1000)
    assert large["high"] - large["low"] < (small["high"] - small["low"]) / 5
    assert large["low"] < 0.5 < large["high"]
    # percentile CI ≈ normal CI: half-width 1.96 · 0.5 / √2000 ≈ 0.0219
    assert (large["high"] - large["low"]) / 2 == pytest.approx(0.0219, rel=0.15)
    half = bootstrap_ci([1, 0] * 1000, confidence=0.5)
    assert (half["high"] - half["low"]) / 2 == pytest.approx(0.0075, rel=0.2)  # 0.674 · se


def test_bootstrap_ci_nan_safe_and_empty():
    r = bootstrap_ci([1.0, float("nan"), 3.0, None])
    assert r["n"] == 2 and r["mean"] == pytest.approx(2.0) and 1.0 <= r["low"] <= r["high"] <= 3.0
    e = bootstrap_ci([])
    assert e["n"] == 0 and all(math.isnan(e[k]) for k in ("mean", "low", "high"))
    one = bootstrap_ci([0.25])
    assert one["low"] == one["high"] == one["mean"] == 0.25
    med = bootstrap_ci([1, 2, 3, 100], statistic="median")
    assert med["value"] == pytest.approx(2.5) and med["mean"] == pytest.approx(26.5)
    with pytest.raises(ValueError):
        bootstrap_ci([1], statistic="mode")
    with pytest.raises(ValueError):
        bootstrap_ci([1], confidence=1.5)


def test_wilson_ci_at_the_edges_and_against_statsmodels():
    none, every = wilson_ci([0] * 48), wilson_ci([1] * 48)
    assert none["statistic"] == "wilson" and none["n"] == 48
    assert none["low"] == 0 and none["high"] == pytest.approx(0.0741, abs=1e-4)
    assert every["high"] == pytest.approx(1.0) and every["low"] == pytest.approx(0.9259, abs=1e-4)
    assert set(none) == set(bootstrap_ci([0, 1]))  # the same dict shape
    proportion_confint = pytest.importorskip("statsmodels.stats.proportion").proportion_confint
    for k, n, conf in ((17, 48, 0.95), (3, 10, 0.9), (1, 1, 0.95)):
        r = wilson_ci([1] * k + [0] * (n - k), confidence=conf)
        low, high = proportion_confint(k, n, alpha=1 - conf, method="wilson")
        assert (r["low"], r["high"]) == pytest.approx((low, high), abs=1e-12)
        assert r["mean"] == r["value"] == k / n
    r = wilson_ci([1, 0, float("nan"), None])
    assert r["n"] == 2 and r["mean"] == 0.5
    assert math.isnan(wilson_ci([])["low"])
    with pytest.raises(ValueError, match="0/1"):
        wilson_ci([0.5, 1])
    with pytest.raises(ValueError, match="confidence"):
        wilson_ci([1], confidence=1.0)


def test_summarise(es_ids):
    texts = [SPANISH, ENGLISH, PORTUGUESE, "el el el el el el el el el"]
    js = [judge_continuation(t, t, "es", es_ids) for t in texts]
    s = summarise(js, n_boot=500)
    assert s["n"] == 4
    assert s["is_target_head"]["mean"] == pytest.approx(0.5)  # Spanish + Portuguese (leak)
    assert s["looping"]["mean"] == pytest.approx(0.25) and s["fluent"]["mean"] == 0.75
    assert s["leak"]["mean"] == pytest.approx(0.25) and s["leak_counts"] == {"pt": 1}
    assert s["script_fraction"]["mean"] == pytest.approx(1.0)
    assert s["looping"]["statistic"] == "wilson" and s["distinct2"]["statistic"] == "mean"
    assert s["distinct2"]["n"] == 4 and s["nll_increase"]["n"] == 0
    for key in ("is_target_head", "is_target_full", "is_target_first_line", "fluent", "looping",
                "leak", "script_fraction", "distinct2"):
        assert s[key]["low"] <= s[key]["mean"] <= s[key]["high"], key
    empty = summarise([])
    assert empty["n"] == 0 and math.isnan(empty["is_target_head"]["mean"])
