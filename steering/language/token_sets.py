"""Language token sets V_lang: which vocabulary entries commit the model to which language.

Every decision is made on the *decoded* text of each token id (``decode([id])``, done once per
id, batched through the Rust backend when there is one), never on raw token strings: raw
strings are byte-mapped mojibake on byte-level BPE (``"à¤ķ"`` for ``"क"``, ``"Ġ"`` for a space)
and carry ``"▁"`` on SentencePiece, which is why the paper's ASCII test gives an English set
with no word-initial tokens.

The rule, in order, for token id ``u`` with decoded text ``s``:

1. **No language** for special and added tokens (``<bos>``, ``<unused12>``, markup added to the
   vocabulary), for tokens with no letters (digits, punctuation, symbols, whitespace, control
   bytes) and for partial UTF-8 tokens (``s`` contains U+FFFD) that have no complete letter. A
   token with U+FFFD *and* complete letters (``"क\\ufffd"`` on byte-level BPE) is judged by its
   letters (``partial_with_letters=True``, the default) or dropped (``False``).
2. **Letters and scripts.** A letter is a character of Unicode category L* or M*; combining
   marks of the Inherited blocks (U+0300–036F, …) are neutral. Each letter has a script from
   :data:`SCRIPT_RANGES`. A language can hold ``u`` only if every letter script of ``u`` is one
   of the language's scripts (:data:`LANGUAGE_SCRIPTS`; ja = Han + Hiragana + Katakana). The
   languages *in play* are the requested ones plus every language of ``corpus_texts`` and of
   ``rivals`` (rivals compete through their wordfreq lists; give texts or rivals of confusable
   languages — pt, mr, … — to make them compete without building their sets); a token won by
   a language that was not requested belongs to no requested language.
3. **Script ownership.** If exactly one language in play can hold ``u`` and ``u`` has no Latin
   letter, that language owns ``u`` (Devanagari → hi when hi is the only Devanagari language in
   play; Cyrillic → ru; Han/Kana → ja; …). Latin is never owned: it is shared by too many
   languages, so Latin tokens always go through the frequency rules, as does any token that
   several languages in play can hold (hi vs mr; zh vs ja on Han).
4. **Corpus ratio (one-vs-rest).** Count each token in each language's corpus (tokenised with
   no special tokens). ``rate_L(u) = (count_L(u) + smoothing) / n_tokens_L``. Among the corpus
   languages that can hold ``u`` (at least two are needed), if ``u`` was seen at least
   ``min_count`` times in total, then ``u`` is language L iff ``count_L(u) ≥ min_count`` and
   ``rate_L(u) ≥ ratio × rate_o(u)`` for every other such language o; otherwise it is shared
   and belongs to no language (the corpus has spoken; word lists are not consulted).
5. **Word lists** (``use_wordfreq``), for tokens the corpus did not decide: the key is the
   decoded text stripped of whitespace and edge punctuation, lower-cased, letters only (plus
   inner ``'`` ``’`` ``-``); ``z_L = wordfreq`` Zipf frequency of the key in L. Among the
   wordfreq-supported languages in play that can hold ``u`` (at least two), ``u`` is L iff
   ``z_L ≥ min_zipf`` and ``z_L ≥ z_o + log10(ratio)`` for every other one (the same ratio on
   Zipf's log10 scale).

Defaults: ``ratio=3``, ``smoothing=1``, ``min_count=3``, ``min_zipf=3`` (one per million
words), ``partial_with_letters=True``. Every token gets a reason code (:data:`REASONS`), so
``to_json`` can say why the sets are the size they are. Word-initial markers do not matter:
``"the"``, ``" the"`` and ``"▁the"`` are judged by their own counts and by the same word
``the``. An empty set is an error naming the language and the tokenizer.
"""

from __future__ import annotations

import json
import math
import string
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

# --------------------------------------------------------------------------- scripts
# (first, last, script) — sorted, non-overlapping. Only letters (L*/M*) are looked up, so the
# Latin blocks may include punctuation and digits without harm.
SCRIPT_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x0000, 0x02AF, "Latin"), (0x0300, 0x036F, "Inherited"), (0x0370, 0x03FF, "Greek"),
    (0x0400, 0x052F, "Cyrillic"), (0x0530, 0x058F, "Armenian"), (0x0590, 0x05FF, "Hebrew"),
    (0x0600, 0x06FF, "Arabic"), (0x0750, 0x077F, "Arabic"), (0x0870, 0x08FF, "Arabic"),
    (0x0900, 0x097F, "Devanagari"), (0x0980, 0x09FF, "Bengali"), (0x0A00, 0x0A7F, "Gurmukhi"),
    (0x0A80, 0x0AFF, "Gujarati"), (0x0B00, 0x0B7F, "Oriya"), (0x0B80, 0x0BFF, "Tamil"),
    (0x0C00, 0x0C7F, "Telugu"), (0x0C80, 0x0CFF, "Kannada"), (0x0D00, 0x0D7F, "Malayalam"),
    (0x0D80, 0x0DFF, "Sinhala"), (0x0E00, 0x0E7F, "Thai"), (0x0E80, 0x0EFF, "Lao"),
    (0x0F00, 0x0FFF, "Tibetan"), (0x1000, 0x109F, "Myanmar"), (0x10A0, 0x10FF, "Georgian"),
    (0x1100, 0x11FF, "Hangul"), (0x1200, 0x139F, "Ethiopic"), (0x1780, 0x17FF, "Khmer"),
    (0x1AB0, 0x1AFF, "Inherited"), (0x1C80, 0x1C8F, "Cyrillic"), (0x1C90, 0x1CBF, "Georgian"),
    (0x1CD0, 0x1CFF, "Devanagari"), (0x1D00, 0x1DBF, "Latin"), (0x1DC0, 0x1DFF, "Inherited"),
    (0x1E00, 0x1EFF, "Latin"), (0x1F00, 0x1FFF, "Greek"), (0x20D0, 0x20FF, "Inherited"),
    (0x2C60, 0x2C7F, "Latin"), (0x2DE0, 0x2DFF, "Cyrillic"), (0x2E80, 0x2FDF, "Han"),
    (0x3005, 0x3007, "Han"), (0x3021, 0x3029, "Han"), (0x3038, 0x303B, "Han"),
    (0x3040, 0x309F, "Hiragana"), (0x30A0, 0x30FF, "Katakana"), (0x3130, 0x318F, "Hangul"),
    (0x31F0, 0x31FF, "Katakana"), (0x3400, 0x4DBF, "Han"), (0x4E00, 0x9FFF, "Han"),
    (0xA640, 0xA69F, "Cyrillic"), (0xA720, 0xA7FF, "Latin"), (0xA8E0, 0xA8FF, "Devanagari"),
    (0xA960, 0xA97F, "Hangul"), (0xAB30, 0xAB6F, "Latin"), (0xAC00, 0xD7FF, "Hangul"),
    (0xF900, 0xFAFF, "Han"), (0xFB00, 0xFB06, "Latin"), (0xFB13, 0xFB17, "Armenian"),
    (0xFB1D, 0xFB4F, "Hebrew"), (0xFB50, 0xFDFF, "Arabic"), (0xFE20, 0xFE2F, "Inherited"),
    (0xFE70, 0xFEFF, "Arabic"), (0xFF21, 0xFF5A, "Latin"), (0xFF66, 0xFF9F, "Katakana"),
    (0xFFA0, 0xFFDC, "Hangul"), (0x20000, 0x3134F, "Han"),
)
_NEUTRAL = "Inherited"
_OTHER = "Other"  # a letter of a script not in the table: no language can hold it
SHARED_SCRIPTS = frozenset({"Latin"})  # never owned: always decided by frequency

_LATIN = ("Latin",)
LANGUAGE_SCRIPTS: dict[str, tuple[str, ...]] = {
    **{lang: _LATIN for lang in (
        "en", "es", "fr", "de", "it", "pt", "ca", "gl", "nl", "pl", "ro", "sv", "da", "nb", "no",
        "fi", "tr", "id", "ms", "vi", "cs", "sk", "sl", "hr", "bs", "sh", "hu", "lt", "lv", "et",
        "is", "sw", "tl", "fil", "eu", "af", "sq", "ga", "cy", "mt", "az", "uz")},
    **{lang: ("Devanagari",) for lang in ("hi", "mr", "ne", "sa", "mai", "bho")},
    **{lang: ("Arabic",) for lang in ("ar", "ur", "fa", "ps", "sd")},
    **{lang: ("Cyrillic",) for lang in ("ru", "uk", "bg", "sr", "mk", "be", "kk", "ky", "mn")},
    "zh": ("Han",), "ja": ("Han", "Hiragana", "Katakana"), "ko": ("Hangul", "Han"),
    "el": ("Greek",), "he": ("Hebrew",), "yi": ("Hebrew",), "hy": ("Armenian",),
    "ka": ("Georgian",), "bn": ("Bengali",), "as": ("Bengali",), "pa": ("Gurmukhi",),
    "gu": ("Gujarati",), "or": ("Oriya",), "ta": ("Tamil",), "te": ("Telugu",),
    "kn": ("Kannada",), "ml": ("Malayalam",), "si": ("Sinhala",), "th": ("Thai",),
    "lo": ("Lao",), "my": ("Myanmar",), "km": ("Khmer",), "am": ("Ethiopic",),
    "bo": ("Tibetan",),
}

# Why each token is (or is not) in a set. Codes ≥ 10 mean "assigned".
REASONS = {
    0: "special_or_added", 1: "no_letters", 2: "partial_utf8", 3: "mixed_scripts",
    4: "unclaimed_script", 5: "contrast_language", 6: "ambiguous", 7: "unseen",
    10: "script", 11: "corpus", 12: "wordfreq",
}
_R = {name: code for code, name in REASONS.items()}
_EDGE_PUNCT = string.punctuation + "¿¡«»“”‘’„‚‹›–—…·"
_INNER_OK = set("'’-")


class TokenSetError(ValueError):
    """A token set that cannot be built as asked (empty set, unknown language or script)."""


def _script_names() -> list[str]:
    names = []
    for _, _, name in SCRIPT_RANGES:
        if name != _NEUTRAL and name not in names:
            names.append(name)
    return names + [_OTHER]


SCRIPTS = tuple(_script_names())
if len(SCRIPTS) > 63:  # per-token script sets are uint64 bit masks
    raise RuntimeError("too many scripts for a uint64 bit mask")


def tokenizer_name(tokenizer) -> str:
    path = getattr(tokenizer, "name_or_path", "") or "?"
    return f"{path} ({type(tokenizer).__name__}, {len(tokenizer)} tokens)"


def decode_vocabulary(tokenizer, size: int | None = None) -> list[str]:
    """``decode([id])`` for every id ``0 … size-1`` (default ``len(tokenizer)``), each once.

    The Rust backend's ``decode_batch`` is used when present (≈0.6 s for 262k ids); the result
    is what ``tokenizer.decode([id], skip_special_tokens=False)`` gives, without the optional
    clean-up of spaces before punctuation.
    """
    size = len(tokenizer) if size is None else size
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
    return [tokenizer.decode([i], skip_special_tokens=False,
                             clean_up_tokenization_spaces=False) for i in range(size)]


def _special_mask(tokenizer, size: int) -> np.ndarray:
    special = np.zeros(size, dtype=bool)
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids |= set((getattr(tokenizer, "added_tokens_decoder", None) or {}).keys())
    ids = [i for i in ids if 0 <= i < size]
    special[ids] = True
    return special


@dataclass
class _TokenScripts:
    bits: np.ndarray  # uint64 [vocab]: set of letter scripts
    n_letters: np.ndarray  # int64 [vocab]
    partial: np.ndarray  # bool [vocab]: contains U+FFFD


def _token_scripts(texts: list[str]) -> _TokenScripts:
    """Per-token letter-script sets, vectorised over the concatenated decoded vocabulary."""
    size = len(texts)
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=size)
    cps = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    uniq, inverse = np.unique(cps, return_inverse=True)
    starts = np.array([r[0] for r in SCRIPT_RANGES], dtype=np.int64)
    ends = np.array([r[1] for r in SCRIPT_RANGES], dtype=np.int64)
    where = np.searchsorted(starts, uniq.astype(np.int64), side="right") - 1
    inside = (where >= 0) & (uniq <= ends[np.maximum(where, 0)])
    script_of_range = np.array([SCRIPTS.index(r[2]) if r[2] != _NEUTRAL else -1
                                for r in SCRIPT_RANGES], dtype=np.int64)
    script = np.where(inside, script_of_range[np.maximum(where, 0)], SCRIPTS.index(_OTHER))
    is_letter = np.array([unicodedata.category(chr(c))[0] in "LM" for c in uniq.tolist()],
                         dtype=bool) & (script >= 0)
    uniq_bits = np.where(is_letter, np.left_shift(np.uint64(1), np.maximum(script, 0)
                                                  .astype(np.uint64)), np.uint64(0))
    char_bits = uniq_bits.astype(np.uint64)[inverse]
    char_letter = is_letter[inverse].astype(np.int64)
    char_fffd = (cps == 0xFFFD).astype(np.int64)
    bits = np.zeros(size, dtype=np.uint64)
    n_letters = np.zeros(size, dtype=np.int64)
    n_fffd = np.zeros(size, dtype=np.int64)
    nonempty = np.flatnonzero(lengths > 0)
    if len(nonempty):
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])[nonempty]
        bits[nonempty] = np.bitwise_or.reduceat(char_bits, offsets)
        n_letters[nonempty] = np.add.reduceat(char_letter, offsets)
        n_fffd[nonempty] = np.add.reduceat(char_fffd, offsets)
    return _TokenScripts(bits, n_letters, n_fffd > 0)


def _script_bits(scripts: Sequence[str]) -> np.uint64:
    out = 0
    for name in scripts:
        if name not in SCRIPTS or name == _OTHER:
            raise TokenSetError(f"unknown script {name!r}; known scripts: "
                                f"{', '.join(s for s in SCRIPTS if s != _OTHER)}")
        out |= 1 << SCRIPTS.index(name)
    return np.uint64(out)


def wordfreq_key(text: str) -> str | None:
    """The word a token stands for in word lists: stripped, lower-cased, letters only."""
    word = text.strip().strip(_EDGE_PUNCT).strip()
    if not word or not all(c.isalpha() or unicodedata.category(c)[0] == "M" or c in _INNER_OK
                           for c in word):
        return None
    return unicodedata.normalize("NFC", word.lower())


def _wordfreq_zipf(lang: str) -> dict[str, float] | None:
    """Zipf frequencies of one language's wordfreq list (None if wordfreq lacks it)."""
    try:
        import wordfreq
    except ImportError as err:
        raise TokenSetError("use_wordfreq=True needs the `wordfreq` package (pip install "
                            "wordfreq), or pass use_wordfreq=False") from err
    if lang not in wordfreq.available_languages():
        return None
    return wordfreq.get_frequency_dict(lang)  # word → frequency; zipf = log10(f) + 9


# --------------------------------------------------------------------------- result
@dataclass
class LanguageTokenSets:
    """Disjoint per-language token sets over one tokenizer's vocabulary.

    ``labels[id]`` is the index into ``languages`` of the token's language, or -1 for none;
    ``reasons[id]`` is a :data:`REASONS` code. Use :meth:`ids` / :meth:`id_tensor` for sorted
    id arrays and :meth:`mask` for boolean masks (padded to a model's logit width if asked).
    """

    languages: tuple[str, ...]
    labels: np.ndarray  # int16 [vocab]
    reasons: np.ndarray  # uint8 [vocab]
    tokenizer: str = "?"
    rule: dict = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    build_seconds: float | None = None

    @property
    def vocab_size(self) -> int:
        return int(len(self.labels))

    def _index(self, lang: str) -> int:
        if lang not in self.languages:
            raise TokenSetError(f"no token set for language {lang!r}; the sets are for "
                                f"{', '.join(self.languages)} (tokenizer {self.tokenizer})")
        return self.languages.index(lang)

    def ids(self, lang: str) -> np.ndarray:
        """Sorted int64 token ids of ``lang``."""
        return np.flatnonzero(self.labels == self._index(lang)).astype(np.int64)

    def id_tensor(self, lang: str, device=None) -> torch.Tensor:
        return torch.from_numpy(self.ids(lang)).to(device)

    def mask(self, lang: str, size: int | None = None, device=None) -> torch.Tensor:
        """Bool mask over ``size`` ids (default the tokenizer's; ids past it are False)."""
        size = self.vocab_size if size is None else size
        if size < self.vocab_size:
            raise TokenSetError(f"mask size {size} is smaller than the tokenizer's vocabulary "
                                f"({self.vocab_size}, {self.tokenizer})")
        out = torch.zeros(size, dtype=torch.bool)
        out[: self.vocab_size] = torch.from_numpy(self.labels == self._index(lang))
        return out.to(device)

    def __contains__(self, item) -> bool:
        lang, token_id = item
        return bool(self.labels[token_id] == self._index(lang))

    @property
    def sizes(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0].astype(np.int64),
                             minlength=len(self.languages))
        return {lang: int(counts[i]) for i, lang in enumerate(self.languages)}

    def reason_counts(self) -> dict[str, int]:
        counts = np.bincount(self.reasons.astype(np.int64), minlength=max(REASONS) + 1)
        return {name: int(counts[code]) for code, name in REASONS.items() if counts[code]}

    def to_json(self, path: str | Path | None = None, include_ids: bool = False) -> dict:
        """Sizes, reasons and example decoded tokens (for inspection); written if ``path``."""
        by_source = {}
        for i, lang in enumerate(self.languages):
            sel = self.reasons[self.labels == i].astype(np.int64)
            by_source[lang] = {REASONS[c]: int((sel == c).sum()) for c in (10, 11, 12)}
        out = {
            "tokenizer": self.tokenizer, "vocab_size": self.vocab_size,
            "languages": list(self.languages), "rule": self.rule, "sizes": self.sizes,
            "by_source": by_source, "reasons": self.reason_counts(),
            "examples": self.examples, "build_seconds": self.build_seconds,
        }
        if include_ids:
            out["ids"] = {lang: self.ids(lang).tolist() for lang in self.languages}
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(out, ensure_ascii=False, indent=2) + "\n",
                                  encoding="utf-8")
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> "LanguageTokenSets":
        """Reload sets written by ``to_json(path, include_ids=True)``."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if "ids" not in data:
            raise TokenSetError(f"{path} has no token ids; write it with include_ids=True")
        sets = cls.from_ids(data["ids"], data["vocab_size"], tokenizer=data["tokenizer"])
        sets.rule, sets.examples = data.get("rule", {}), data.get("examples", {})
        return sets

    @classmethod
    def from_ids(cls, ids: dict[str, Sequence[int]], vocab_size: int,
                 tokenizer: str = "manual") -> "LanguageTokenSets":
        """Sets given by hand (tests, imports); they must be disjoint."""
        labels = np.full(vocab_size, -1, dtype=np.int16)
        reasons = np.full(vocab_size, _R["unseen"], dtype=np.uint8)
        for i, (lang, members) in enumerate(ids.items()):
            members = np.asarray(list(members), dtype=np.int64)
            if len(members) and (members.min() < 0 or members.max() >= vocab_size):
                raise TokenSetError(f"token ids of {lang!r} fall outside 0…{vocab_size - 1}")
            if (labels[members] >= 0).any():
                raise TokenSetError(f"token set of {lang!r} overlaps an earlier language's")
            labels[members] = i
            reasons[members] = _R["script"]
        return cls(tuple(ids), labels, reasons, tokenizer=tokenizer, rule={"manual": True})


# --------------------------------------------------------------------------- builder
def _corpus_counts(tokenizer, texts: list[str], size: int) -> np.ndarray:
    if not texts:
        return np.zeros(size, dtype=np.int64)
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    flat = np.fromiter((i for ids in encoded for i in ids), dtype=np.int64)
    flat = flat[(flat >= 0) & (flat < size)]
    return np.bincount(flat, minlength=size)


@dataclass
class _Contest:
    """The rule's state over the vocabulary: who may hold each token, who won it, and why."""

    in_play: list[str]  # requested languages first, then rival-only ones
    texts: list[str]  # decoded tokens
    eligible: np.ndarray  # (languages, vocab): every letter script of the token is the language's
    owned: np.ndarray  # decided by script ownership
    contested: np.ndarray  # eligible somewhere and not owned
    reasons: np.ndarray
    winner: np.ndarray  # index into in_play, -1: none
    decided: np.ndarray  # the corpus ratios decided it (won or ambiguous)


def _check_request(corpus_texts: dict[str, Sequence[str]], languages: Sequence[str], ratio: float,
                   smoothing: float, min_count: int, use_wordfreq: bool,
                   scripts: dict[str, Sequence[str]] | None, rivals: Sequence[str]):
    """The requested languages, the script table, every language in play and their wordfreq
    lists; a TokenSetError for a request the rule cannot serve."""
    if ratio <= 1:
        raise TokenSetError(f"ratio must be > 1 (got {ratio}); a ratio ≤ 1 is not one-vs-rest")
    if min_count < 1 or smoothing <= 0:
        raise TokenSetError(f"min_count must be ≥ 1 and smoothing > 0 (got {min_count}, "
                            f"{smoothing})")
    languages = tuple(dict.fromkeys(languages))
    if not languages:
        raise TokenSetError("no languages requested")
    table = {**LANGUAGE_SCRIPTS, **{k: tuple(v) for k, v in (scripts or {}).items()}}
    in_play = list(dict.fromkeys([*languages, *corpus_texts, *rivals]))
    unknown = [lang for lang in in_play if lang not in table]
    if unknown:
        raise TokenSetError(f"no script known for language(s) {unknown}; pass scripts="
                            f"{{'{unknown[0]}': ('Latin',)}} or use one of "
                            f"{', '.join(sorted(table))}")
    lists = {i: _wordfreq_zipf(lang) if use_wordfreq else None for i, lang in enumerate(in_play)}
    mute = [lang for i, lang in enumerate(in_play)
            if lang not in languages and not corpus_texts.get(lang) and lists[i] is None]
    if mute:
        raise TokenSetError(f"rival language(s) {mute} have neither corpus texts nor a "
                            "wordfreq list (or use_wordfreq=False): they could claim tokens "
                            "without evidence. Give texts for them or drop them.")
    return languages, table, in_play, lists


def _script_contest(tokenizer, table: dict, in_play: list[str], partial_with_letters: bool
                    ) -> _Contest:
    """Steps 1–3: eligibility by script, the reasons of tokens no language can hold, and
    script ownership."""
    size = len(tokenizer)
    texts = decode_vocabulary(tokenizer, size)
    info = _token_scripts(texts)
    special = _special_mask(tokenizer, size)

    # Eligibility: every letter script of the token is one of the language's scripts.
    lang_bits = np.array([_script_bits(table[lang]) for lang in in_play], dtype=np.uint64)
    has_letters = info.n_letters > 0
    usable = has_letters & ~special & (partial_with_letters | ~info.partial)
    eligible = usable[None, :] & ((info.bits[None, :] & ~lang_bits[:, None]) == 0)
    n_eligible = eligible.sum(0)
    latin = (info.bits & _script_bits(["Latin"])) != 0

    reasons = np.full(size, _R["unseen"], dtype=np.uint8)
    winner = np.full(size, -1, dtype=np.int64)  # index into in_play
    reasons[has_letters & (n_eligible == 0)] = _R["mixed_scripts"]
    single = (info.bits & (info.bits - np.uint64(1))) == 0  # at most one script bit
    other_bit = np.uint64(1) << np.uint64(SCRIPTS.index(_OTHER))
    unclaimed = has_letters & (n_eligible == 0) & (single | ((info.bits & other_bit) != 0))
    reasons[unclaimed] = _R["unclaimed_script"]
    reasons[info.partial & ~(has_letters & partial_with_letters)] = _R["partial_utf8"]
    reasons[~has_letters & ~info.partial] = _R["no_letters"]
    reasons[special] = _R["special_or_added"]

    # 3. Script ownership.
    owned = (n_eligible == 1) & ~latin
    winner[owned] = eligible[:, owned].argmax(0)
    reasons[owned] = _R["script"]
    contested = n_eligible >= 1
    contested &= ~owned
    return _Contest(in_play, texts, eligible, owned, contested, reasons, winner,
                    np.zeros(size, dtype=bool))


def _decide_by_corpus(contest: _Contest, tokenizer, corpus_texts: dict[str, Sequence[str]],
                      ratio: float, smoothing: float, min_count: int) -> dict[str, np.ndarray]:
    """Step 4: corpus ratios among the corpus languages that can hold the token. Returns the
    corpus counts per language (the examples' ranking)."""
    c, size = contest, len(contest.texts)
    corpus_langs = [i for i, lang in enumerate(c.in_play) if corpus_texts.get(lang)]
    if not corpus_langs:
        return {}
    counts = np.stack([_corpus_counts(tokenizer, corpus_texts[c.in_play[i]], size)
                       for i in corpus_langs])
    elig_c = c.eligible[corpus_langs]
    n_tok = np.maximum(counts.sum(1, keepdims=True), 1)
    rate = np.where(elig_c, (counts + smoothing) / n_tok, -np.inf)
    total = np.where(elig_c, counts, 0).sum(0)
    c.decided = c.contested & (elig_c.sum(0) >= 2) & (total >= min_count)
    for row, lang_i in enumerate(corpus_langs if len(corpus_langs) >= 2 else []):
        rival = np.delete(rate, row, axis=0).max(0)
        win = c.decided & elig_c[row] & (counts[row] >= min_count) & (rate[row] >= ratio * rival)
        c.winner[win] = lang_i
        c.reasons[win] = _R["corpus"]
    c.reasons[c.decided & (c.winner < 0)] = _R["ambiguous"]
    return {c.in_play[i]: counts[row] for row, i in enumerate(corpus_langs)}


def _decide_by_wordfreq(contest: _Contest, lists: dict, ratio: float, min_zipf: float
                        ) -> dict[str, np.ndarray]:
    """Step 5: word lists for what the corpus did not decide. Returns the Zipf frequencies per
    language (the examples' ranking)."""
    c, size = contest, len(contest.texts)
    zipf_of: dict[str, np.ndarray] = {}
    wf_langs = [i for i, d in lists.items() if d is not None]
    todo = c.contested & ~c.decided & (c.eligible[wf_langs].sum(0) >= 2) if wf_langs else None
    if todo is None or not todo.any():
        return zipf_of
    cand = np.flatnonzero(todo)
    keys = [wordfreq_key(c.texts[i]) for i in cand]
    zipf = np.full((len(wf_langs), len(cand)), -np.inf)
    for row, lang_i in enumerate(wf_langs):
        freq = lists[lang_i]
        vals = np.fromiter((freq.get(k, 0.0) if k else 0.0 for k in keys),
                           dtype=np.float64, count=len(cand))
        with np.errstate(divide="ignore"):
            zipf[row] = np.where(c.eligible[lang_i, cand] & (vals > 0),
                                 np.log10(vals) + 9, -np.inf)
        full = np.zeros(size)
        full[cand] = np.where(np.isfinite(zipf[row]), zipf[row], 0.0)
        zipf_of[c.in_play[lang_i]] = full
    margin = math.log10(ratio)
    heard = (zipf >= min_zipf).any(0)
    for row, lang_i in enumerate(wf_langs):
        rival = np.delete(zipf, row, axis=0).max(0)
        win = (zipf[row] >= min_zipf) & (zipf[row] >= rival + margin)
        c.winner[cand[win]] = lang_i
        c.reasons[cand[win]] = _R["wordfreq"]
    c.reasons[cand[heard & (c.winner[cand] < 0)]] = _R["ambiguous"]
    return zipf_of


def _requested_labels(contest: _Contest, languages: Sequence[str]) -> np.ndarray:
    """Winners that are rivals only (not requested) take the token out of every requested
    set; the label of each token (index into ``languages``, -1: none)."""
    c = contest
    requested = np.array([lang in languages for lang in c.in_play])
    contrast = (c.winner >= 0) & ~requested[np.maximum(c.winner, 0)]
    c.reasons[contrast] = _R["contrast_language"]
    c.winner[contrast] = -1
    return c.winner.astype(np.int16)  # requested languages come first in in_play


def _check_not_empty(contest: _Contest, labels: np.ndarray, languages: Sequence[str],
                     table: dict, corpus_texts: dict[str, Sequence[str]], name: str) -> None:
    """A TokenSetError naming why, when a requested language got no token."""
    c, problems = contest, []
    for i, lang in enumerate(languages):
        if (labels == i).any():
            continue
        why = {REASONS[code]: int(n) for code, n in
               zip(*np.unique(c.reasons[c.eligible[i]], return_counts=True))}
        problems.append(
            f"the token set of language {lang!r} is empty for tokenizer {name}: "
            f"{int(c.eligible[i].sum())} tokens have only {'/'.join(table[lang])} letters"
            + (f" (why none is {lang!r}: {why})" if why else "")
            + (f"; {lang!r} has no corpus texts" if not corpus_texts.get(lang) else "")
            + ("; tokens of a shared script need a rival language sharing it (corpus texts "
               "or rivals=...)" if not any(j != i and set(table[other]) & set(table[lang])
                                           for j, other in enumerate(c.in_play)) else ""))
    if problems:
        raise TokenSetError("; ".join(problems) + ". Check the language codes, give corpus "
                            "texts (and a rival language sharing the script), or use another "
                            "tokenizer.")


def _examples(contest: _Contest, labels: np.ndarray, languages: Sequence[str],
              corpus_count_of: dict, zipf_of: dict, n_examples: int) -> dict[str, list[str]]:
    """Each set's most frequent tokens (corpus count first, then Zipf frequency)."""
    size, examples = len(contest.texts), {}
    for i, lang in enumerate(languages):
        members = np.flatnonzero(labels == i)
        score = corpus_count_of.get(lang, np.zeros(size))[members].astype(np.float64)
        score = score * 100 + zipf_of.get(lang, np.zeros(size))[members]
        top = members[np.argsort(-score, kind="stable")[:n_examples]]
        examples[lang] = [contest.texts[j] for j in top]
    return examples


def build_language_token_sets(
    tokenizer,
    corpus_texts: dict[str, Sequence[str]],
    languages: Sequence[str],
    *,
    ratio: float = 3.0,
    smoothing: float = 1.0,
    min_count: int = 3,
    use_wordfreq: bool = True,
    min_zipf: float = 3.0,
    partial_with_letters: bool = True,
    scripts: dict[str, Sequence[str]] | None = None,
    rivals: Sequence[str] = (),
    n_examples: int = 20,
) -> LanguageTokenSets:
    """Build disjoint token sets for ``languages`` by the rule in this module's docstring.

    ``corpus_texts`` maps language → texts (the discovery split of a parallel corpus, say);
    languages in it that are not requested act as rivals only. ``rivals``: more rival-only
    languages without texts; they compete through their wordfreq lists (e.g. ``("es",)`` when
    building V_en from an en/hi corpus, where Latin tokens would otherwise have no rival).
    ``scripts`` adds or overrides entries of :data:`LANGUAGE_SCRIPTS`. Raises
    :class:`TokenSetError` if a set is empty.
    """
    started = time.perf_counter()
    languages, table, in_play, lists = _check_request(corpus_texts, languages, ratio, smoothing,
                                                      min_count, use_wordfreq, scripts, rivals)
    name = tokenizer_name(tokenizer)
    contest = _script_contest(tokenizer, table, in_play, partial_with_letters)
    corpus_count_of = _decide_by_corpus(contest, tokenizer, corpus_texts, ratio, smoothing,
                                        min_count)
    zipf_of = _decide_by_wordfreq(contest, lists, ratio, min_zipf) if use_wordfreq else {}
    labels = _requested_labels(contest, languages)
    rule = dict(ratio=ratio, smoothing=smoothing, min_count=min_count,
                use_wordfreq=use_wordfreq, min_zipf=min_zipf,
                partial_with_letters=partial_with_letters, in_play=in_play,
                rivals_only=[lang for lang in in_play if lang not in languages],
                scripts={lang: list(table[lang]) for lang in in_play},
                corpus_tokens={lang: int(c.sum()) for lang, c in corpus_count_of.items()})
    _check_not_empty(contest, labels, languages, table, corpus_texts, name)
    examples = _examples(contest, labels, languages, corpus_count_of, zipf_of, n_examples)
    return LanguageTokenSets(languages, labels, reasons=contest.reasons, tokenizer=name,
                             rule=rule, examples=examples,
                             build_seconds=time.perf_counter() - started)
