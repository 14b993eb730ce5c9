"""Load user corpora (hub datasets or local files) into ``ParallelCorpus`` / ``Document`` lists.

Everything goes through ``datasets.load_dataset`` so hub ids and local files share one code path:

* ``cfg.path`` is a local file or folder when it exists (or looks like a path: starts with ``.``,
  ``/`` or ``~``, or ends in a supported suffix). Supported suffixes and their ``datasets`` builder:
  ``.jsonl``/``.json`` → json, ``.csv`` → csv, ``.tsv`` → csv (tab separated), ``.txt`` → text
  (one row per line, column ``text``), ``.parquet`` → parquet. A folder is read as all supported
  files under it (recursively, hidden files skipped), which must share one builder. Local data is
  always read as one table (``cfg.hf_split`` is not used for it).
* Otherwise ``cfg.path`` is a hub id:
  ``load_dataset(cfg.path, cfg.subset, split=cfg.hf_split, **cfg.load_kwargs)``.
  ``cfg.load_kwargs`` (e.g. ``cache_dir``, ``keep_in_memory``) is passed to local loads as well.

Parallel layouts (``cfg.kind == "parallel"``, ``cfg.layout``); ``code(lang)`` below means
``cfg.language_codes.get(lang, lang)``:

* ``"translation"`` — OPUS-100 (``Helsinki-NLP/opus-100``, subset ``en-es``) / IITB
  (``cfilt/iitb-english-hindi``): rows ``{cfg.translation_column: {code(lang): text, ...}}``.
* ``"columns"`` — one column per language, named ``code(lang)``:
  ``{"en": ..., "es": ..., "hi": ...}``.
* ``"flores_plus"`` — FLORES+ (``openlanguagedata/flores_plus``): one subset per language
  (``code(lang)``, e.g. ``"eng_Latn"``) with rows ``{"id", "iso_639_3", "iso_15924", "text"}``,
  aligned across languages by ``cfg.id_column``; the text is ``cfg.text_column``. Sources:
  a hub id (one ``load_dataset(path, code, split=cfg.hf_split)`` per language); a local folder
  holding one file per subset named ``<code>.<suffix>`` (e.g. ``dir/eng_Latn.jsonl``; searched
  recursively, and when several match — ``dev/`` and ``devtest/`` — the one under a folder named
  ``cfg.hf_split`` wins); or a single local file holding the rows of all languages, whose subset is
  ``f"{iso_639_3}_{iso_15924}"``.
* ``"files"`` — one plain-text file per language (``cfg.files``: language → path), line-aligned
  (the Moses / OPUS plain format). ``cfg.path`` is not used.

Kind ``"text"``: any table with the column ``cfg.text_column`` (``.txt`` files: one document per
line, column ``text``), all in language ``cfg.language``.

Common rules:

* Pairs where any language's text is empty or whitespace (and empty documents) are dropped and the
  count is logged; if nothing is left the corpus is reported as empty.
* Splits: when the rows have a ``split`` column whose values are all in ``SPLITS`` it is used.
  Otherwise each pair gets discovery / tuning / evaluation from a hash of its reference-language
  (first language) text bucketed by ``cfg.split_fractions`` — so the same sentence always lands
  in the same split, whatever the corpus size, ``cfg.seed`` or ``cfg.max_items``, and a sentence
  shared by two corpora (en-es and en-hi) cannot leak between splits.
* ``cfg.splits`` then keeps only those splits, and ``cfg.max_items`` keeps the first N of a
  ``cfg.seed``-seeded shuffle (returned in corpus order).
* Pair ids are the ``cfg.id_column`` value when the rows have one, else ``f"{cfg.name}-{row}"``.
  A ``topic`` column, when present, fills ``ParallelCorpus.topics``.

Bad input raises ``CorpusError`` naming the input and what to do about it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import datasets

from sae_train.corpora.types import SPLITS, CorpusError, Document, ParallelCorpus, check_documents

if TYPE_CHECKING:  # config imports Hydra; the loaders only need the attributes
    from sae_train.config import DataConfig

log = logging.getLogger(__name__)

LAYOUTS = ("translation", "columns", "flores_plus", "files")
BUILDER_BY_SUFFIX = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "text",
    ".parquet": "parquet",
}
SPLIT_COLUMN = "split"
TOPIC_COLUMN = "topic"
FLORES_CODE_COLUMNS = ("iso_639_3", "iso_15924")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_parallel_dataset(cfg: DataConfig) -> ParallelCorpus:
    """Aligned sentences in ``cfg.languages`` from a hub dataset or local files (see module doc)."""
    _require_kind(cfg, "parallel", "load_parallel_dataset")
    if cfg.layout not in LAYOUTS:
        raise CorpusError(
            f"unknown parallel layout {cfg.layout!r} for data {cfg.name!r}; supported layouts: "
            f"{list(LAYOUTS)}"
        )
    languages = list(cfg.languages)
    if not languages:
        raise CorpusError(f"data {cfg.name!r}: `languages` is empty; list at least one language")
    fractions = _check_split_options(cfg)

    reader = {
        "translation": _read_translation_layout,
        "columns": _read_columns_layout,
        "flores_plus": _read_flores_plus_layout,
        "files": _read_files_layout,
    }[cfg.layout]
    pairs = _drop_empty_pairs(reader(cfg, languages))

    reference = pairs.texts[languages[0]]
    splits = _assign_splits(reference, pairs.splits, fractions)
    keep = _select(splits, cfg, pairs.source, unit="pairs")
    return ParallelCorpus(
        texts={lang: [pairs.texts[lang][i] for i in keep] for lang in languages},
        splits=[splits[i] for i in keep],
        ids=[pairs.ids[i] for i in keep],
        topics=[pairs.topics[i] for i in keep] if pairs.topics else [],
        name=cfg.name,
    )


def load_text_dataset(cfg: DataConfig) -> list[Document]:
    """Unpaired documents from the column ``cfg.text_column`` of a hub dataset or local file(s)."""
    _require_kind(cfg, "text", "load_text_dataset")
    fractions = _check_split_options(cfg)
    table = _load_table(cfg, cfg.path, cfg.subset)
    # The `text` builder (.txt files) always names its one column "text".
    column = "text" if table.builder == "text" else cfg.text_column
    texts = [_as_text(v) for v in _column(table, column, "text column (`text_column`)")]
    row_splits = _row_splits(table)

    kept = [i for i, text in enumerate(texts) if text.strip()]
    if not kept:
        raise CorpusError(
            f"{table.source} is empty: all {len(texts)} rows have empty text in column {column!r}"
        )
    _log_dropped(table.source, len(texts) - len(kept), len(texts), "empty documents")
    texts = [texts[i] for i in kept]
    given = [row_splits[i] for i in kept] if row_splits is not None else None

    splits = _assign_splits(texts, given, fractions)
    keep = _select(splits, cfg, table.source, unit="documents")
    docs = [
        Document(doc_id=n, text=texts[i], language=cfg.language, split=splits[i], pair_id=-1,
                 source=cfg.name)
        for n, i in enumerate(keep)
    ]
    return check_documents(docs, name=cfg.name)


# --------------------------------------------------------------------------------------------
# Loading tables through `datasets`
# --------------------------------------------------------------------------------------------


@dataclass
class _Table:
    """One loaded dataset and how to name it in error messages."""

    rows: datasets.Dataset
    # e.g. "local file 'x.jsonl'" or "dataset 'org/name' (subset 'en-es', split 'train')"
    source: str
    builder: Optional[str] = None  # the packaged builder for local files, None for hub datasets


def _load_table(cfg: DataConfig, path: Optional[str], subset: Optional[str]) -> _Table:
    if not path:
        raise CorpusError(
            f"data {cfg.name!r}: `path` is not set; give a hub dataset id or a local file/folder"
        )
    if _looks_local(path):
        return _load_local(Path(path).expanduser(), dict(cfg.load_kwargs))
    return _load_hub(path, subset, cfg.hf_split, dict(cfg.load_kwargs))


def _looks_local(path: str) -> bool:
    # Hub ids look like "owner/name"; anything that exists or reads as a file path is local.
    candidate = Path(path).expanduser()
    return (
        candidate.exists()
        or path.startswith((".", "/", "~"))
        or candidate.suffix.lower() in BUILDER_BY_SUFFIX
    )


def _load_local(path: Path, load_kwargs: dict[str, Any], plain_text: bool = False) -> _Table:
    """Load a local file/folder; ``plain_text`` reads one file as lines whatever its suffix."""
    builder, files = ("text", [_existing(path)]) if plain_text else _local_data_files(path)
    kind = "local folder" if path.is_dir() else "local file"
    source = f"{kind} {str(path)!r}"
    # The builders fail obscurely on 0-byte files; an empty folder/file is simply an empty corpus.
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise CorpusError(f"{source} is empty: no rows to load; point `path` at a non-empty file")
    # User load_kwargs come last so they can override the defaults chosen here.
    data_files = [str(f) for f in files]
    kwargs = {**_builder_options(builder, files), "data_files": data_files, **load_kwargs}
    try:
        rows = datasets.load_dataset(builder, split="train", **kwargs)
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as err:
        raise CorpusError(f"could not read {source} with the {builder!r} builder: {err}") from err
    if len(rows) == 0:
        raise CorpusError(f"{source} is empty: no rows to load")
    return _Table(rows, source, builder)


def _existing(path: Path) -> Path:
    if not path.exists():
        raise CorpusError(
            f"local path {str(path)!r} does not exist; give an existing file/folder "
            f"({', '.join(sorted(BUILDER_BY_SUFFIX))}) or a hub dataset id"
        )
    return path


def _local_data_files(path: Path) -> tuple[str, list[Path]]:
    """The builder name and the data files for a local file or folder."""
    supported = sorted(BUILDER_BY_SUFFIX)
    if _existing(path).is_file():
        builder = BUILDER_BY_SUFFIX.get(path.suffix.lower())
        if builder is None:
            raise CorpusError(
                f"unsupported file suffix {path.suffix!r} for {str(path)!r}; supported: "
                f"{', '.join(supported)}"
            )
        return builder, [path]
    files = _supported_files(path)
    if not files:
        raise CorpusError(
            f"local folder {str(path)!r} holds no data files; supported suffixes: "
            f"{', '.join(supported)}"
        )
    builders = {BUILDER_BY_SUFFIX[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        suffixes = sorted({f.suffix.lower() for f in files})
        raise CorpusError(
            f"local folder {str(path)!r} mixes file types {suffixes}; keep one format per folder"
        )
    return builders.pop(), files


def _supported_files(folder: Path) -> list[Path]:
    return sorted(
        f for f in folder.rglob("*")
        if f.is_file()
        and f.suffix.lower() in BUILDER_BY_SUFFIX
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
    )


def _builder_options(builder: str, files: list[Path]) -> dict[str, Any]:
    if builder != "csv":
        return {}
    # keep_default_na=False: a sentence reading "NA" or "null" stays text; empty cells become "".
    options: dict[str, Any] = {"keep_default_na": False}
    if files[0].suffix.lower() == ".tsv":
        options["delimiter"] = "\t"
    return options


def _load_hub(path: str, subset: Optional[str], split: str,
              load_kwargs: dict[str, Any]) -> _Table:
    source = f"dataset {path!r}" + (f" (subset {subset!r}, split {split!r})" if subset
                                    else f" (split {split!r})")
    try:
        rows = datasets.load_dataset(path, subset, split=split, **load_kwargs)
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as err:
        raise CorpusError(
            f"could not load {source}: {err}. A local path must exist and end in one of "
            f"{sorted(BUILDER_BY_SUFFIX)}; a hub id must be reachable or already cached "
            "(HF_DATASETS_OFFLINE=1 uses the cache only)"
        ) from err
    if len(rows) == 0:
        raise CorpusError(f"{source} is empty: no rows to load")
    return _Table(rows, source)


# --------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------


def _column(table: _Table, name: str, role: str) -> list:
    if name not in table.rows.column_names:
        raise CorpusError(
            f"{role} {name!r} does not exist in {table.source}; available columns: "
            f"{table.rows.column_names}"
        )
    return list(table.rows[name])


def _optional_column(table: _Table, name: str) -> Optional[list]:
    return list(table.rows[name]) if name in table.rows.column_names else None


def _as_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def _row_ids(table: _Table, id_column: str, name: str) -> list[str]:
    ids = _optional_column(table, id_column)
    if ids is None:
        return [f"{name}-{i}" for i in range(len(table.rows))]
    return [str(v) for v in ids]


def _row_splits(table: _Table) -> Optional[list[str]]:
    """The rows' own `split` column when every value is one of SPLITS, else None."""
    values = _optional_column(table, SPLIT_COLUMN)
    if values is None:
        return None
    if set(values) <= set(SPLITS):
        return list(values)
    log.warning("%s: column %r has values %s outside %s; assigning splits by hash instead",
                table.source, SPLIT_COLUMN, sorted(set(map(str, values)) - set(SPLITS))[:5],
                list(SPLITS))
    return None


# --------------------------------------------------------------------------------------------
# Parallel layouts: each returns the raw aligned rows (empty texts still in)
# --------------------------------------------------------------------------------------------


@dataclass
class _Pairs:
    texts: dict[str, list[str]]
    ids: list[str]
    splits: Optional[list[str]]
    topics: Optional[list[str]]
    source: str

    def subset(self, keep: list[int]) -> _Pairs:
        return _Pairs({lang: _pick(v, keep) for lang, v in self.texts.items()},
                      _pick(self.ids, keep), _pick(self.splits, keep), _pick(self.topics, keep),
                      self.source)


def _pick(values: Optional[list], keep: list[int]) -> Optional[list]:
    return [values[i] for i in keep] if values is not None else None


def _code(cfg: DataConfig, lang: str) -> str:
    return cfg.language_codes.get(lang, lang)


def _pairs_from_table(cfg: DataConfig, table: _Table, texts: dict[str, list[str]]) -> _Pairs:
    topics = _optional_column(table, TOPIC_COLUMN)
    return _Pairs(texts, _row_ids(table, cfg.id_column, cfg.name), _row_splits(table),
                  [_as_text(t) for t in topics] if topics is not None else None, table.source)


def _read_columns_layout(cfg: DataConfig, languages: list[str]) -> _Pairs:
    table = _load_table(cfg, cfg.path, cfg.subset)
    available = table.rows.column_names
    texts = {}
    for lang in languages:
        column = _code(cfg, lang)
        if column not in available:
            raise _missing_language(lang, column, table.source, "columns", available)
        texts[lang] = [_as_text(v) for v in table.rows[column]]
    return _pairs_from_table(cfg, table, texts)


def _read_translation_layout(cfg: DataConfig, languages: list[str]) -> _Pairs:
    table = _load_table(cfg, cfg.path, cfg.subset)
    records = _column(table, cfg.translation_column, "translation column (`translation_column`)")
    available = _translation_keys(table, cfg.translation_column, records)
    texts = {}
    for lang in languages:
        key = _code(cfg, lang)
        if key not in available:
            raise _missing_language(lang, key, table.source, "languages", sorted(available))
        texts[lang] = [_as_text((record or {}).get(key)) for record in records]
    return _pairs_from_table(cfg, table, texts)


def _translation_keys(table: _Table, column: str, records: list) -> set[str]:
    feature = table.rows.features[column]
    if isinstance(feature, datasets.Translation):
        return set(feature.languages)
    if isinstance(feature, dict):
        return set(feature)
    # Rows with differing keys are stored as a generic JSON feature: look at the rows themselves.
    keys: set[str] = set()
    for record in records:
        if isinstance(record, dict):
            keys.update(record)
    return keys


def _read_files_layout(cfg: DataConfig, languages: list[str]) -> _Pairs:
    files = dict(cfg.files)
    missing = [lang for lang in languages if lang not in files]
    if missing:
        raise CorpusError(
            f"language(s) {missing} missing from the `files` of parallel data {cfg.name!r}; it "
            f"has files for {sorted(files)}; add `files.<lang>: path/to/file.txt`"
        )
    texts = {}
    for lang in languages:
        # Moses files are named by language (corpus.en-es.en), so any suffix is read as lines.
        table = _load_local(Path(files[lang]).expanduser(), dict(cfg.load_kwargs), plain_text=True)
        texts[lang] = [_as_text(v) for v in table.rows["text"]]
    counts = {lang: len(v) for lang, v in texts.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{lang}: {files[lang]!r} has {n} lines" for lang, n in counts.items())
        raise CorpusError(
            f"parallel files of {cfg.name!r} are not line-aligned ({detail}); every file needs one "
            "line per sentence pair"
        )
    n = next(iter(counts.values()))
    source = f"parallel files {[files[lang] for lang in languages]}"
    return _Pairs(texts, [f"{cfg.name}-{i}" for i in range(n)], None, None, source)


def _read_flores_plus_layout(cfg: DataConfig, languages: list[str]) -> _Pairs:
    tables = _flores_tables(cfg, languages)
    reference_lang = languages[0]
    reference = tables[reference_lang]
    order = [str(v) for v in _column(reference, cfg.id_column, "id column (`id_column`)")]
    texts = {}
    for lang in languages:
        by_id = _flores_texts_by_id(cfg, lang, tables[lang])
        _check_same_ids(lang, by_id, reference_lang, order, cfg)
        texts[lang] = [by_id[i] for i in order]
    topics = _optional_column(reference, TOPIC_COLUMN)
    return _Pairs(texts, order, _row_splits(reference),
                  [_as_text(t) for t in topics] if topics is not None else None,
                  f"FLORES+ data {cfg.path!r}")


def _flores_texts_by_id(cfg: DataConfig, lang: str, table: _Table) -> dict[str, str]:
    ids = [str(v) for v in _column(table, cfg.id_column, "id column (`id_column`)")]
    texts = _column(table, cfg.text_column, "text column (`text_column`)")
    by_id = dict(zip(ids, map(_as_text, texts)))
    if len(by_id) != len(ids):
        raise CorpusError(
            f"FLORES+ {table.source}: language {lang!r} repeats {len(ids) - len(by_id)} ids in "
            f"column {cfg.id_column!r}; each sentence id must appear once per language"
        )
    return by_id


def _check_same_ids(lang: str, by_id: dict[str, str], reference_lang: str, order: list[str],
                    cfg: DataConfig) -> None:
    lacking = [i for i in order if i not in by_id]
    extra = sorted(set(by_id) - set(order))
    if lacking or extra:
        raise CorpusError(
            f"FLORES+ data {cfg.path!r}: ids of {lang!r} ({_code(cfg, lang)}) do not match "
            f"{reference_lang!r} ({_code(cfg, reference_lang)}): {len(lacking)} missing "
            f"(e.g. {lacking[:5]}), {len(extra)} extra (e.g. {extra[:5]}); use the same FLORES+ "
            "split (dev or devtest) for every language"
        )


def _flores_tables(cfg: DataConfig, languages: list[str]) -> dict[str, _Table]:
    """One table per language: hub subsets, files in a local folder, or one shared local file."""
    if not cfg.path:
        raise CorpusError(f"data {cfg.name!r}: layout flores_plus needs `path` (hub id or local)")
    load_kwargs = dict(cfg.load_kwargs)
    if not _looks_local(cfg.path):
        return {lang: _load_hub(cfg.path, _code(cfg, lang), cfg.hf_split, load_kwargs)
                for lang in languages}
    root = Path(cfg.path).expanduser()
    if root.is_dir():
        return {lang: _load_local(_flores_file(root, _code(cfg, lang), lang, cfg), load_kwargs)
                for lang in languages}
    return _split_flores_file(cfg, _load_local(root, load_kwargs), languages)


def _flores_file(folder: Path, code: str, lang: str, cfg: DataConfig) -> Path:
    files = _supported_files(folder)
    matches = [f for f in files if f.stem == code]
    if len(matches) > 1:  # e.g. dev/eng_Latn.parquet and devtest/eng_Latn.parquet
        matches = [f for f in matches if cfg.hf_split in f.relative_to(folder).parts[:-1]]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise _missing_language(lang, code, f"FLORES+ folder {str(folder)!r}", "subset files",
                                sorted({f.stem for f in files}))
    raise CorpusError(
        f"FLORES+ folder {str(folder)!r} has several files for {code!r} "
        f"({[str(m) for m in matches]}); keep one, or set `hf_split` to the folder to use"
    )


def _split_flores_file(cfg: DataConfig, table: _Table, languages: list[str]) -> dict[str, _Table]:
    """Rows of every language in one file: the subset code is `{iso_639_3}_{iso_15924}`."""
    missing = [c for c in FLORES_CODE_COLUMNS if c not in table.rows.column_names]
    if missing:
        raise CorpusError(
            f"FLORES+ {table.source} holds one table but lacks {missing} to tell languages apart; "
            f"available columns: {table.rows.column_names}. Give a folder with one file per subset "
            "(eng_Latn.jsonl, spa_Latn.jsonl, ...) instead"
        )
    codes = [f"{a}_{b}" for a, b in zip(*(table.rows[c] for c in FLORES_CODE_COLUMNS))]
    tables = {}
    for lang in languages:
        code = _code(cfg, lang)
        rows = [i for i, c in enumerate(codes) if c == code]
        if not rows:
            raise _missing_language(lang, code, table.source, "subsets", sorted(set(codes)))
        tables[lang] = _Table(table.rows.select(rows), f"{table.source} [{code}]", table.builder)
    return tables


def _missing_language(lang: str, code: str, source: str, what: str, available: list) -> CorpusError:
    named = repr(lang) if code == lang else f"{lang!r} (as {code!r})"
    return CorpusError(
        f"language {named} is missing from parallel {source}; its {what}: {list(available)}. "
        "Fix `languages`, or map the language with `language_codes`"
    )


# --------------------------------------------------------------------------------------------
# Cleaning, splits and selection
# --------------------------------------------------------------------------------------------


def _drop_empty_pairs(pairs: _Pairs) -> _Pairs:
    n = len(pairs.ids)
    if n == 0:
        raise CorpusError(f"{pairs.source} is empty: no sentence pairs")
    keep = [i for i in range(n) if all(texts[i].strip() for texts in pairs.texts.values())]
    if not keep:
        raise CorpusError(
            f"{pairs.source} is empty: all {n} pairs have an empty translation in some language"
        )
    _log_dropped(pairs.source, n - len(keep), n, "pairs with an empty translation")
    return pairs.subset(keep) if len(keep) < n else pairs


def _log_dropped(source: str, dropped: int, total: int, what: str) -> None:
    if dropped:
        log.warning("%s: dropped %d of %d %s", source, dropped, total, what)


def _require_kind(cfg: DataConfig, kind: str, function: str) -> None:
    if cfg.kind != kind:
        raise CorpusError(f"{function} needs data.kind={kind!r}, got {cfg.kind!r} ({cfg.name!r})")


def _check_split_options(cfg: DataConfig) -> list[float]:
    """Validate `splits`, `split_fractions` and `max_items`; returns the normalised fractions."""
    if cfg.splits is not None:
        unknown = [s for s in cfg.splits if s not in SPLITS]
        if unknown:
            raise CorpusError(f"data {cfg.name!r}: unknown splits {unknown} in `splits`; use "
                              f"{list(SPLITS)}")
    fractions = [float(f) for f in cfg.split_fractions]
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise CorpusError(
            f"data {cfg.name!r}: `split_fractions` {fractions} must be {len(SPLITS)} non-negative "
            f"numbers (for {list(SPLITS)}) with a positive sum"
        )
    if cfg.max_items is not None and cfg.max_items < 1:
        raise CorpusError(f"data {cfg.name!r}: `max_items` must be positive or null, got "
                          f"{cfg.max_items}")
    total = sum(fractions)
    return [f / total for f in fractions]


def _assign_splits(keys: list[str], given: Optional[list[str]],
                   fractions: list[float]) -> list[str]:
    """The rows' own splits if they have them, else a split per item from a hash of its key text."""
    if given is not None:
        return list(given)
    return [_hash_split(key, fractions) for key in keys]


def _hash_split(text: str, fractions: list[float]) -> str:
    # A content hash (not Python's salted hash()) so the split is stable across runs and machines.
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split, fraction in zip(SPLITS, fractions):
        edge += fraction
        if position < edge:
            return split
    return next(s for s, f in zip(reversed(SPLITS), reversed(fractions)) if f > 0)


def _select(splits: list[str], cfg: DataConfig, source: str, unit: str) -> list[int]:
    """Indices kept by `cfg.splits` then `cfg.max_items` (a seeded choice, in corpus order)."""
    keep = [i for i, s in enumerate(splits) if cfg.splits is None or s in cfg.splits]
    if not keep:
        counts = {s: splits.count(s) for s in SPLITS}
        raise CorpusError(
            f"{source}: no {unit} in splits {list(cfg.splits)} (it has {counts}); change `splits` "
            "or `split_fractions`"
        )
    if cfg.max_items is not None and len(keep) > cfg.max_items:
        shuffled = list(keep)
        random.Random(cfg.seed).shuffle(shuffled)
        keep = sorted(shuffled[: cfg.max_items])
    return keep
