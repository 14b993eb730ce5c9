"""Text-level judgement of generated continuations: language, script, repetition, leakage.

Pure functions on text (no model): the caller generates, decodes the head (the first 16
generated tokens) and the full continuation, and — when it has them — the NLL of the steered
and of the unsteered continuation under the *unsteered* model. A continuation **counts as the
target language** only when both hold:

1. **Language ID says target.** py3langid restricted to ``[target, "en"]`` (a fresh identifier
   per restriction, never the module-global one) labels the text ``target`` with probability
   ``≥ min_confidence`` (0.9), and the text has at least ``min_letters`` (3) letters. On short
   or junk text py3langid is confidently wrong — ``"\\nUCI\\nLarver"`` → Spanish at 0.51,
   ``"-\\n-\\n"`` → anything, it has no letters — hence the letter floor and the confidence
   floor (real Spanish of a few words scores ≥ 0.97 against English; junk ≈ 0.5–0.75).
2. **Fluency guards pass** (:class:`FluencyGuards`, all on the *full* continuation):

   - at least ``min_letters`` letters (``"-\\n-\\n"`` is not text);
   - not looping (:func:`looping_reason`, thresholds below);
   - for a non-Latin target (hi: Devanagari, ur: Arabic) at least ``min_script_fraction`` (0.8)
     of the letters are in the target's script (:func:`script_fraction`);
   - when both NLLs are given: ``nll_steered − nll_base ≤ max_nll_increase`` (1.0 nat/token).

The same rule is applied to three texts — the head, the full continuation and its first
non-empty line — giving ``is_target_head`` (the DEFAULT criterion, before the ΔM condition),
``is_target_full`` and ``is_target_first_line`` (an answer that starts in English and switches
later is not a target-language answer).

**Letters and scripts.** A letter is a character with ``str.isalpha()`` or a combining mark
(category M*) of a script's own block, so Devanagari matras and the virama (U+093E…, U+094D)
count as Devanagari letters; marks of the Inherited blocks (U+0300–036F, …) are neutral and not
counted. Scripts come from :data:`SCRIPT_RANGES` (Latin: basic, Latin-1, Extended-A/B, IPA,
Extended Additional, …; Devanagari: U+0900–097F, U+A8E0–A8FF, Vedic U+1CD0–1CFF; Arabic: its
blocks and presentation forms); a letter outside the table is script ``"Other"``.

**Looping** (:func:`looping_reason`), on whitespace tokens normalised by case-folding and
stripping edge punctuation (a token of punctuation only is kept as it is):

- ``distinct_2 < 0.5`` with at least 8 words (:data:`MIN_DISTINCT2`, :data:`MIN_WORDS`);
- one word is more than 40 % of at least 8 words (:data:`MAX_WORD_SHARE`);
- a unit of 1–4 words repeated back to back at least 3 times, covering at least 6 words
  (``"de la de la de la"``; :data:`MAX_TANDEM_UNIT`, :data:`MIN_TANDEM_REPEATS`,
  :data:`MIN_TANDEM_WORDS`);
- text with fewer than 8 words but at least 24 non-space characters (scripts without spaces,
  one long token) whose distinct character 3-grams are fewer than 0.4 of all of them
  (:data:`CHAR_N`, :data:`MIN_CHARS`, :data:`MIN_CHAR_DISTINCT`).

**Leakage** to confusable languages (:data:`CONFUSABLE`: Marathi/Nepali/Urdu for Hindi,
Portuguese/Italian/Catalan/Galician for Spanish): the full continuation is identified with a
second identifier restricted to ``[target, "en", *CONFUSABLE[target]]``; ``leak`` is its label
when that label is a confusable language with probability ``≥ min_leak_confidence`` (0.5),
else ``None``. :func:`identifiers_for` builds both identifiers.

**Statistics.** Rates (0/1 outcomes) get a Wilson score interval (:func:`wilson_ci`), which
stays honest at 0 % and 100 %; means get a percentile bootstrap over items (:func:`bootstrap_ci`,
NaNs dropped, deterministic for a seed); :func:`summarise` gives every rate and mean with its CI.
"""

from __future__ import annotations

import bisect
import copy
import functools
import math
import string
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

# --------------------------------------------------------------------------- scripts
# (first, last, script) — sorted, non-overlapping. Only letters (L*, or M* outside the
# Inherited blocks) are looked up, so the Latin block may include punctuation and digits.
SCRIPT_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x0000, 0x02AF, "Latin"), (0x0300, 0x036F, "Inherited"), (0x0370, 0x03FF, "Greek"),
    (0x0400, 0x052F, "Cyrillic"), (0x0590, 0x05FF, "Hebrew"), (0x0600, 0x06FF, "Arabic"),
    (0x0750, 0x077F, "Arabic"), (0x0870, 0x08FF, "Arabic"), (0x0900, 0x097F, "Devanagari"),
    (0x0980, 0x09FF, "Bengali"), (0x1AB0, 0x1AFF, "Inherited"), (0x1CD0, 0x1CFF, "Devanagari"),
    (0x1D00, 0x1DBF, "Latin"), (0x1DC0, 0x1DFF, "Inherited"), (0x1E00, 0x1EFF, "Latin"),
    (0x20D0, 0x20FF, "Inherited"), (0x2C60, 0x2C7F, "Latin"), (0xA720, 0xA7FF, "Latin"),
    (0xA8E0, 0xA8FF, "Devanagari"), (0xAB30, 0xAB6F, "Latin"), (0xFB00, 0xFB06, "Latin"),
    (0xFB50, 0xFDFF, "Arabic"), (0xFE20, 0xFE2F, "Inherited"), (0xFE70, 0xFEFF, "Arabic"),
    (0xFF21, 0xFF5A, "Latin"),
)
_NEUTRAL = "Inherited"
_OTHER = "Other"
_RANGE_STARTS = [r[0] for r in SCRIPT_RANGES]

SCRIPTS: dict[str, str] = {
    **{lang: "Devanagari" for lang in ("hi", "mr", "ne")},
    "ur": "Arabic",
    **{lang: "Latin" for lang in ("es", "en", "pt", "it", "ca", "gl", "fr", "de")},
}
_KNOWN_SCRIPTS = frozenset(r[2] for r in SCRIPT_RANGES if r[2] != _NEUTRAL) | {_OTHER}

CONFUSABLE: dict[str, list[str]] = {"hi": ["mr", "ne", "ur"], "es": ["pt", "it", "ca", "gl"]}

# --------------------------------------------------------------------------- thresholds
MIN_LETTERS = 3  # fewer letters: no language (identify → (None, 0.0)) and not fluent
MIN_CONFIDENCE = 0.9  # target-vs-English probability needed to call a text the target
MIN_LEAK_CONFIDENCE = 0.5  # probability needed to call a text a confusable language
MIN_WORDS = 8  # word-level looping rules need this many whitespace tokens
MIN_DISTINCT2 = 0.5  # distinct word bigrams / bigrams below this: looping
MAX_WORD_SHARE = 0.4  # one word above this share of the words: looping
MAX_TANDEM_UNIT = 4  # longest word unit searched for back-to-back repetition
MIN_TANDEM_REPEATS = 3  # …repeated at least this many times…
MIN_TANDEM_WORDS = 6  # …covering at least this many words: looping
CHAR_N = 3  # character n-grams for texts with few words
MIN_CHARS = 24  # the character rule needs this many non-space characters
MIN_CHAR_DISTINCT = 0.4  # distinct character n-grams / n-grams below this: looping
MIN_SCRIPT_FRACTION = 0.8  # non-Latin targets: share of letters in the target's script
MAX_NLL_INCREASE = 1.0  # nats/token: steered continuation NLL − unsteered continuation NLL

_EDGE_PUNCT = string.punctuation + "¿¡«»“”‘’„‚‹›–—…·।॥"


def _script_of(ch: str) -> str:
    cp = ord(ch)
    i = bisect.bisect_right(_RANGE_STARTS, cp) - 1
    if i >= 0 and cp <= SCRIPT_RANGES[i][1]:
        return SCRIPT_RANGES[i][2]
    return _OTHER


def letter_script(ch: str) -> str | None:
    """Script of ``ch`` when it is a letter (isalpha, or a non-Inherited combining mark)."""
    if not (ch.isalpha() or unicodedata.category(ch).startswith("M")):
        return None
    script = _script_of(ch)
    return None if script == _NEUTRAL else script


def count_letters(text: str) -> int:
    """Number of letters in ``text`` (see the module docstring)."""
    return sum(1 for ch in text if letter_script(ch) is not None)


def _resolve_script(script: str) -> str:
    if script in _KNOWN_SCRIPTS:
        return script
    if script in SCRIPTS:
        return SCRIPTS[script]
    raise ValueError(f"unknown script or language {script!r}: scripts are "
                     f"{sorted(_KNOWN_SCRIPTS)}, languages {sorted(SCRIPTS)}")


def script_fraction(text: str, script: str) -> float:
    """Fraction of the letters of ``text`` in ``script`` (a script name such as ``"Devanagari"``
    or a language code of :data:`SCRIPTS`); 0.0 for text without letters."""
    script = _resolve_script(script)
    scripts = [s for s in map(letter_script, text) if s is not None]
    if not scripts:
        return 0.0
    return sum(s == script for s in scripts) / len(scripts)


def target_script(target: str) -> str:
    """The script of ``target``'s letters; ValueError for a language not in :data:`SCRIPTS`."""
    if target not in SCRIPTS:
        raise ValueError(f"no script known for language {target!r}; known: {sorted(SCRIPTS)}")
    return SCRIPTS[target]


# --------------------------------------------------------------------------- language ID
def _py3langid_class():
    from py3langid.langid import LanguageIdentifier as _Py3LangId
    return _Py3LangId


@functools.lru_cache(maxsize=1)
def _template_identifier():
    """One unrestricted py3langid identifier (norm_probs=True), private to this module.

    py3langid ≥ 0.4 loads with ``from_model_file``, older releases with ``from_pickled_model``;
    both take the package's ``MODEL_FILE``.
    """
    from py3langid.langid import MODEL_FILE
    cls = _py3langid_class()
    load = getattr(cls, "from_model_file", None) or getattr(cls, "from_pickled_model")
    return load(MODEL_FILE, norm_probs=True)


def _fresh_identifier():
    """A new py3langid identifier: a shallow copy of the template (the model arrays are shared
    read-only; ``set_languages`` replaces, never mutates them), so loading happens once."""
    return copy.copy(_template_identifier())


def supported_languages() -> list[str]:
    """Language codes py3langid can identify."""
    template = _template_identifier()
    return sorted(set(getattr(template, "labels", None) or template.nb_classes))


class LanguageIdentifier:
    """py3langid restricted to ``languages``, with probabilities normalised over them.

    Every instance owns its own py3langid identifier, so callers restricting differently never
    interfere. ``identify`` returns ``(None, 0.0)`` for text with fewer than ``min_letters``
    letters.
    """

    def __init__(self, languages: Sequence[str], min_letters: int = MIN_LETTERS):
        langs = list(dict.fromkeys(languages))
        if not langs:
            raise ValueError("LanguageIdentifier needs at least one language")
        supported = set(supported_languages())
        unknown = [lang for lang in langs if lang not in supported]
        if unknown:
            raise ValueError(f"language(s) {unknown} not supported by py3langid "
                             f"({len(supported)} supported, e.g. en, es, hi)")
        if min_letters < 0:
            raise ValueError(f"min_letters must be ≥ 0, got {min_letters}")
        self.languages: tuple[str, ...] = tuple(langs)
        self.min_letters = min_letters
        self._model = _fresh_identifier()
        self._model.set_languages(langs)

    def __repr__(self) -> str:
        return f"LanguageIdentifier({list(self.languages)}, min_letters={self.min_letters})"

    def identify(self, text: str) -> tuple[str | None, float]:
        """(language, probability among ``languages``), or (None, 0.0) for too few letters."""
        if count_letters(text) < self.min_letters:
            return None, 0.0
        lang, prob = self._model.classify(text)
        return lang, float(prob)

    def rank(self, text: str) -> list[tuple[str, float]]:
        """All ``languages`` by probability, best first ([] for too few letters)."""
        if count_letters(text) < self.min_letters:
            return []
        return [(lang, float(p)) for lang, p in self._model.rank(text)]


def identifiers_for(target: str, english: str = "en",
                    min_letters: int = MIN_LETTERS
                    ) -> tuple[LanguageIdentifier, LanguageIdentifier]:
    """(main, leak): ``main`` restricted to ``[target, english]`` decides "is it the target";
    ``leak`` restricted to ``[target, english, *CONFUSABLE[target]]`` detects leakage."""
    if target == english:
        raise ValueError(f"target and english are both {target!r}: nothing to contrast")
    main = LanguageIdentifier([target, english], min_letters=min_letters)
    leak = LanguageIdentifier([target, english, *CONFUSABLE.get(target, [])],
                              min_letters=min_letters)
    return main, leak


# --------------------------------------------------------------------------- repetition
def _norm_token(token: str) -> str:
    return token.strip(_EDGE_PUNCT).casefold() or token


def words(text: str) -> list[str]:
    """Whitespace tokens, case-folded, edge punctuation stripped (punctuation-only tokens kept)."""
    return [_norm_token(t) for t in text.split()]


def _ngrams(items: Sequence, n: int) -> list[tuple]:
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    return [tuple(items[i:i + n]) for i in range(len(items) - n + 1)]


def distinct_n(text: str, n: int = 2) -> float:
    """Distinct word n-grams / word n-grams over whitespace tokens; 1.0 with fewer than n words."""
    grams = _ngrams(words(text), n)
    return len(set(grams)) / len(grams) if grams else 1.0


def max_ngram_share(text: str, n: int = 1) -> float:
    """Share of the commonest word n-gram among all word n-grams; 0.0 with fewer than n words."""
    grams = _ngrams(words(text), n)
    return Counter(grams).most_common(1)[0][1] / len(grams) if grams else 0.0


def char_distinct_n(text: str, n: int = CHAR_N) -> float:
    """Distinct character n-grams / n-grams over the non-space characters; 1.0 if too short."""
    chars = "".join(text.split())
    grams = _ngrams(chars, n)
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_tandem_repeat(tokens: Sequence[str], max_unit: int = MAX_TANDEM_UNIT,
                          min_repeats: int = 2) -> tuple[int, int]:
    """(unit length, repeats) of the back-to-back repetition of a 1…max_unit-token unit, repeated
    at least ``min_repeats`` times, that covers the most tokens (ties: the shorter unit);
    (0, 0) when there is none."""
    best, best_cover = (0, 0), 0
    n = len(tokens)
    for unit in range(1, max_unit + 1):
        for start in range(n - unit + 1):
            pattern = tokens[start:start + unit]
            reps = 1
            while tokens[start + reps * unit:start + (reps + 1) * unit] == pattern:
                reps += 1
            if reps >= min_repeats and unit * reps > best_cover:
                best, best_cover = (unit, reps), unit * reps
    return best


@dataclass
class FluencyGuards:
    """Thresholds a continuation must pass to count as fluent text (see the module docstring)."""

    min_distinct2: float = MIN_DISTINCT2
    max_word_share: float = MAX_WORD_SHARE
    min_words: int = MIN_WORDS
    min_script_fraction: float = MIN_SCRIPT_FRACTION  # non-Latin targets only
    max_nll_increase: float | None = MAX_NLL_INCREASE  # None: no NLL guard
    min_letters: int = MIN_LETTERS
    min_confidence: float = MIN_CONFIDENCE
    min_leak_confidence: float = MIN_LEAK_CONFIDENCE
    max_tandem_unit: int = MAX_TANDEM_UNIT
    min_tandem_repeats: int = MIN_TANDEM_REPEATS
    min_tandem_words: int = MIN_TANDEM_WORDS
    char_n: int = CHAR_N
    min_chars: int = MIN_CHARS
    min_char_distinct: float = MIN_CHAR_DISTINCT


def looping_reason(text: str, guards: FluencyGuards | None = None) -> str | None:
    """Why ``text`` is looping (``"distinct2"``, ``"word_share"``, ``"tandem"``, ``"chars"``),
    or None when it is not."""
    g = guards or FluencyGuards()
    toks = words(text)
    if len(toks) >= g.min_words:
        if distinct_n(text, 2) < g.min_distinct2:
            return "distinct2"
        if max_ngram_share(text, 1) > g.max_word_share:
            return "word_share"
    unit, reps = longest_tandem_repeat(toks, g.max_tandem_unit, g.min_tandem_repeats)
    if reps and unit * reps >= g.min_tandem_words:
        return "tandem"
    if len(toks) < g.min_words and len("".join(text.split())) >= g.min_chars:
        if char_distinct_n(text, g.char_n) < g.min_char_distinct:
            return "chars"
    return None


def is_looping(text: str, guards: FluencyGuards | None = None) -> bool:
    """True when ``text`` repeats itself (:func:`looping_reason` gives the rule)."""
    return looping_reason(text, guards) is not None


def first_line(text: str) -> str:
    """The first non-empty line of ``text``, stripped ("" if there is none)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


# --------------------------------------------------------------------------- judgement
@dataclass
class Judgement:
    """The verdict on one continuation (see the module docstring for the rule)."""

    target: str
    lang_head: str | None
    head_confidence: float
    lang_full: str | None
    full_confidence: float
    lang_first_line: str | None
    first_line_confidence: float
    script_fraction: float  # of the target's script, over the full continuation
    distinct2: float
    looping: bool
    looping_reason: str | None
    nll_increase: float | None  # nll_steered − nll_base when both were given
    failed_guards: list[str] = field(default_factory=list)
    fluent: bool = False
    is_target_head: bool = False
    is_target_full: bool = False
    is_target_first_line: bool = False
    leak: str | None = None
    leak_confidence: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


def failed_guards(full: str, target: str, guards: FluencyGuards | None = None,
                  nll_steered: float | None = None, nll_base: float | None = None
                  ) -> list[str]:
    """Names of the fluency guards ``full`` fails: ``"letters"``, ``"looping"``, ``"script"``,
    ``"nll"`` ([] = fluent)."""
    g = guards or FluencyGuards()
    failed = []
    if count_letters(full) < g.min_letters:
        failed.append("letters")
    if is_looping(full, g):
        failed.append("looping")
    script = target_script(target)
    if script != "Latin" and script_fraction(full, script) < g.min_script_fraction:
        failed.append("script")
    if (g.max_nll_increase is not None and _finite(nll_steered) and _finite(nll_base)
            and nll_steered - nll_base > g.max_nll_increase):
        failed.append("nll")
    return failed


IdentifierArg = LanguageIdentifier | tuple[LanguageIdentifier, LanguageIdentifier]


def judge_continuation(head: str, full: str, target: str, identifier: IdentifierArg,
                       guards: FluencyGuards | None = None, nll_steered: float | None = None,
                       nll_base: float | None = None, *,
                       leak_identifier: LanguageIdentifier | None = None) -> Judgement:
    """Judge one continuation: ``head`` is the text of its first 16 generated tokens, ``full``
    the whole continuation. ``identifier`` is the main identifier (restricted to
    ``[target, "en"]``) or the pair from :func:`identifiers_for`; without a leak identifier
    ``leak`` is None. NLLs (nats/token under the unsteered model) may be None."""
    if isinstance(identifier, tuple):
        if leak_identifier is not None:
            raise ValueError("give the leak identifier either in the pair or as leak_identifier")
        identifier, leak_identifier = identifier
    for ident in (identifier, leak_identifier):
        if ident is not None and target not in ident.languages:
            raise ValueError(f"identifier {ident!r} cannot say {target!r}: "
                             f"build it with identifiers_for({target!r})")
    g = guards or FluencyGuards()
    failed = failed_guards(full, target, g, nll_steered, nll_base)
    fluent = not failed

    def is_target(lang: str | None, conf: float) -> bool:
        return fluent and lang == target and conf >= g.min_confidence

    lang_head, conf_head = identifier.identify(head)
    lang_full, conf_full = identifier.identify(full)
    line = first_line(full)
    lang_line, conf_line = identifier.identify(line)
    leak, leak_conf = None, 0.0
    if leak_identifier is not None:
        lang_leak, conf_leak = leak_identifier.identify(full)
        if (lang_leak in CONFUSABLE.get(target, []) and lang_leak != target
                and conf_leak >= g.min_leak_confidence):
            leak, leak_conf = lang_leak, conf_leak
    increase = (nll_steered - nll_base
                if _finite(nll_steered) and _finite(nll_base) else None)
    return Judgement(
        target=target, lang_head=lang_head, head_confidence=conf_head, lang_full=lang_full,
        full_confidence=conf_full, lang_first_line=lang_line, first_line_confidence=conf_line,
        script_fraction=script_fraction(full, target_script(target)),
        distinct2=distinct_n(full, 2), looping="looping" in failed,
        looping_reason=looping_reason(full, g), nll_increase=increase, failed_guards=failed,
        fluent=fluent, is_target_head=is_target(lang_head, conf_head),
        is_target_full=is_target(lang_full, conf_full),
        is_target_first_line=is_target(lang_line, conf_line), leak=leak,
        leak_confidence=leak_conf)


# --------------------------------------------------------------------------- statistics
_STATISTICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda a: a.mean(axis=-1),
    "median": lambda a: np.median(a, axis=-1),
}
_BOOT_BLOCK = 1_000_000  # resampled values per block (bounds memory for large n)


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, confidence: float = 0.95,
                 seed: int = 0, statistic: str = "mean") -> dict:
    """Percentile bootstrap CI of ``statistic`` ("mean" or "median") over items.

    NaNs (and None) are dropped; ``n`` is the number of items kept. Returns ``{"mean", "low",
    "high", "n", "statistic", "value"}`` — ``mean`` is the mean, ``value`` the statistic's point
    estimate and ``low``/``high`` its CI; all NaN when ``n == 0``. Deterministic for a seed.
    """
    if statistic not in _STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; choose one of {sorted(_STATISTICS)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be ≥ 1, got {n_boot}")
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    n = int(arr.size)
    out = {"mean": math.nan, "low": math.nan, "high": math.nan, "n": n,
           "statistic": statistic, "value": math.nan}
    if n == 0:
        return out
    stat = _STATISTICS[statistic]
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOT_BLOCK // n)
    boots = []
    for start in range(0, n_boot, rows):
        idx = rng.integers(0, n, size=(min(rows, n_boot - start), n))
        boots.append(stat(arr[idx]))
    boots = np.concatenate(boots)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(boots, [alpha, 1.0 - alpha])
    out.update(mean=float(arr.mean()), value=float(stat(arr)), low=float(low), high=float(high))
    return out


def wilson_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Wilson score interval of a proportion: ``values`` are 0/1 outcomes (NaN and None
    dropped). The same dict as :func:`bootstrap_ci` with ``statistic="wilson"``; ``value`` and
    ``mean`` are the observed rate. Unlike a percentile bootstrap it does not collapse at 0 or
    1: 0 of 48 gives [0, 0.074], 48 of 48 [0.926, 1]. Computed by
    ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``."""
    from scipy.stats import binomtest

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    n = int(arr.size)
    out = {"mean": math.nan, "low": math.nan, "high": math.nan, "n": n,
           "statistic": "wilson", "value": math.nan}
    if n == 0:
        return out
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError("wilson_ci takes 0/1 outcomes; use bootstrap_ci for a mean")
    k = int(arr.sum())
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    out.update(mean=k / n, value=k / n, low=float(ci.low), high=float(ci.high))
    return out


_RATES = ("is_target_head", "is_target_full", "is_target_first_line", "fluent", "looping")


def summarise(judgements: Sequence[Judgement], n_boot: int = 2000, confidence: float = 0.95,
              seed: int = 0) -> dict:
    """Rates with Wilson intervals (:func:`wilson_ci`) and means with bootstrap CIs over
    ``judgements``: the rates ``is_target_head``, ``is_target_full``, ``is_target_first_line``,
    ``fluent``, ``looping``, ``leak`` (share with any leak); the means ``script_fraction``,
    ``distinct2``, ``nll_increase`` (over those that have it); plus ``n`` and ``leak_counts``
    (confusable language → count)."""
    ci = functools.partial(bootstrap_ci, n_boot=n_boot, confidence=confidence, seed=seed)
    rate = functools.partial(wilson_ci, confidence=confidence)
    out: dict = {"n": len(judgements)}
    for name in _RATES:
        out[name] = rate([float(getattr(j, name)) for j in judgements])
    out["leak"] = rate([float(j.leak is not None) for j in judgements])
    out["leak_counts"] = dict(Counter(j.leak for j in judgements if j.leak is not None))
    out["script_fraction"] = ci([j.script_fraction for j in judgements])
    out["distinct2"] = ci([j.distinct2 for j in judgements])
    out["nll_increase"] = ci([j.nll_increase for j in judgements])
    return out
