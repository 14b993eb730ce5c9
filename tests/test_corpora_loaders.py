"""Corpus loaders on small local files shaped like OPUS-100, IITB, FLORES+ and plain text.

Everything runs offline through the real `datasets` library; its cache goes under tmp_path.
"""

from __future__ import annotations

import csv
import json
import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: never touch the hub

import datasets  # noqa: E402
import pytest  # noqa: E402

from sae_train.config import DataConfig  # noqa: E402
from sae_train.corpora.loaders import load_parallel_dataset, load_text_dataset  # noqa: E402
from sae_train.corpora.types import SPLITS, CorpusError  # noqa: E402

HI_1 = "अपने अनुप्रयोग को पहुंचनीयता व्यायाम का लाभ दें"
HI_2 = "एक्सेर्साइसर पहुंचनीयता अन्वेषक"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # In case another test module imported `datasets` before the environment variable was set.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def config(tmp_path, **fields) -> DataConfig:
    """A DataConfig whose `datasets` cache lives in tmp_path."""
    fields.setdefault("load_kwargs", {"cache_dir": str(tmp_path / "hf_cache")})
    return DataConfig(**fields)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def opus_rows(n):
    return [{"translation": {"en": f"This is sentence number {i}.",
                             "es": f"Esta es la frase número {i}."}} for i in range(n)]


@pytest.fixture
def opus_file(tmp_path):
    return write_jsonl(tmp_path / "opus100-en-es.jsonl", opus_rows(100))


def opus_config(tmp_path, path, **fields):
    return config(tmp_path, kind="parallel", name="opus", path=str(path), layout="translation",
                  languages=["en", "es"], **fields)


# ------------------------------------------------------------------ translation layout


def test_opus100_translation_jsonl(tmp_path, opus_file):
    corpus = load_parallel_dataset(opus_config(tmp_path, opus_file))
    assert len(corpus) == 100
    assert corpus.languages == ["en", "es"]
    assert corpus.texts["en"][7] == "This is sentence number 7."
    assert corpus.texts["es"][7] == "Esta es la frase número 7."
    assert corpus.ids[7] == "opus-7"  # no id column: name-index
    assert corpus.name == "opus"


def test_splits_are_deterministic_and_follow_fractions(tmp_path, opus_file):
    first = load_parallel_dataset(opus_config(tmp_path, opus_file))
    again = load_parallel_dataset(opus_config(tmp_path, opus_file))
    assert first.splits == again.splits
    counts = first.split_counts()
    assert set(counts) == set(SPLITS)
    assert 45 <= counts["discovery"] <= 75
    assert 8 <= counts["tuning"] <= 32
    assert 8 <= counts["evaluation"] <= 32


def test_split_depends_on_the_pair_not_its_position(tmp_path, opus_file):
    full = load_parallel_dataset(opus_config(tmp_path, opus_file))
    reversed_file = write_jsonl(tmp_path / "reversed.jsonl", opus_rows(100)[::-1])
    backwards = load_parallel_dataset(opus_config(tmp_path, reversed_file))
    split_of = dict(zip(full.texts["en"], full.splits))
    assert all(split_of[t] == s for t, s in zip(backwards.texts["en"], backwards.splits))


def test_split_fractions_change_the_assignment(tmp_path, opus_file):
    corpus = load_parallel_dataset(opus_config(tmp_path, opus_file, split_fractions=[0, 0, 1]))
    assert corpus.split_counts() == {"evaluation": 100}


def test_splits_filter(tmp_path, opus_file):
    full = load_parallel_dataset(opus_config(tmp_path, opus_file))
    only_eval = load_parallel_dataset(opus_config(tmp_path, opus_file, splits=["evaluation"]))
    expected = [t for t, s in zip(full.texts["en"], full.splits) if s == "evaluation"]
    assert only_eval.texts["en"] == expected
    assert set(only_eval.splits) == {"evaluation"}
    two = load_parallel_dataset(opus_config(tmp_path, opus_file, splits=["discovery", "tuning"]))
    assert len(two) == len(full) - len(only_eval)


def test_max_items_is_a_deterministic_subset(tmp_path, opus_file):
    full = load_parallel_dataset(opus_config(tmp_path, opus_file))
    a = load_parallel_dataset(opus_config(tmp_path, opus_file, max_items=10))
    b = load_parallel_dataset(opus_config(tmp_path, opus_file, max_items=10))
    c = load_parallel_dataset(opus_config(tmp_path, opus_file, max_items=10, seed=1))
    assert len(a) == 10 and a.ids == b.ids and a.texts == b.texts
    assert a.ids != c.ids  # another seed, another subset
    assert a.ids == sorted(a.ids, key=full.ids.index)  # kept in corpus order
    pair = full.ids.index(a.ids[0])
    assert a.texts["es"][0] == full.texts["es"][pair] and a.splits[0] == full.splits[pair]


def test_iitb_devanagari_and_empty_translations_dropped(tmp_path, caplog):
    rows = [
        {"translation": {"en": "Give your application an accessibility workout", "hi": HI_1}},
        {"translation": {"en": "Accerciser Accessibility Explorer", "hi": HI_2}},
        {"translation": {"en": "The default plugin layout", "hi": "   "}},
        {"translation": {"en": "", "hi": "डिफ़ॉल्ट प्लग-इन खाका"}},
    ]
    path = write_jsonl(tmp_path / "iitb.jsonl", rows)
    cfg = config(tmp_path, kind="parallel", name="iitb", path=str(path), layout="translation",
                 languages=["en", "hi"])
    with caplog.at_level("WARNING"):
        corpus = load_parallel_dataset(cfg)
    assert len(corpus) == 2
    assert corpus.texts["hi"] == [HI_1, HI_2]
    assert corpus.texts["en"][1] == "Accerciser Accessibility Explorer"
    assert corpus.ids == ["iitb-0", "iitb-1"]
    assert "dropped 2 of 4" in caplog.text


def test_rows_with_their_own_split_column_keep_it(tmp_path):
    rows = [{"translation": {"en": f"s{i}", "es": f"e{i}"}, "split": split}
            for i, split in enumerate(["evaluation", "discovery", "tuning", "evaluation"])]
    path = write_jsonl(tmp_path / "with_split.jsonl", rows)
    corpus = load_parallel_dataset(opus_config(tmp_path, path))
    assert corpus.splits == ["evaluation", "discovery", "tuning", "evaluation"]


def test_translation_language_missing(tmp_path, opus_file):
    cfg = opus_config(tmp_path, opus_file)
    cfg.languages = ["en", "hi"]
    with pytest.raises(CorpusError, match=r"language 'hi' is missing .*opus100-en-es\.jsonl.*\['en', 'es'\]"):
        load_parallel_dataset(cfg)


def test_translation_column_missing(tmp_path, opus_file):
    cfg = opus_config(tmp_path, opus_file, translation_column="pair")
    with pytest.raises(CorpusError, match=r"'pair' does not exist .*available columns: \['translation'\]"):
        load_parallel_dataset(cfg)


# ------------------------------------------------------------------ columns layout


@pytest.fixture
def columns_csv(tmp_path):
    path = tmp_path / "trilingual.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "en", "es", "hi"])
        writer.writerow(["a1", "The cat sleeps.", "El gato duerme.", "बिल्ली सोती है।"])
        writer.writerow(["a2", "Hello, world.", "Hola, mundo.", "नमस्ते, दुनिया।"])
        writer.writerow(["a3", "NA", "No disponible.", "उपलब्ध नहीं।"])
    return path


def test_columns_csv(tmp_path, columns_csv):
    cfg = config(tmp_path, kind="parallel", name="tri", path=str(columns_csv), layout="columns")
    corpus = load_parallel_dataset(cfg)
    assert corpus.languages == ["en", "es", "hi"]
    assert corpus.ids == ["a1", "a2", "a3"]
    assert corpus.texts["es"][1] == "Hola, mundo."
    assert corpus.texts["hi"][0] == "बिल्ली सोती है।"
    assert corpus.texts["en"][2] == "NA"  # not turned into a missing value


def test_columns_with_language_codes(tmp_path):
    path = write_jsonl(tmp_path / "coded.jsonl", [{"english": "Good morning.", "spanish": "Buenos días."}])
    cfg = config(tmp_path, kind="parallel", name="coded", path=str(path), layout="columns",
                 languages=["en", "es"], language_codes={"en": "english", "es": "spanish"})
    corpus = load_parallel_dataset(cfg)
    assert corpus.texts == {"en": ["Good morning."], "es": ["Buenos días."]}


def test_columns_language_missing(tmp_path, columns_csv):
    cfg = config(tmp_path, kind="parallel", name="tri", path=str(columns_csv), layout="columns",
                 languages=["en", "fr"])
    with pytest.raises(CorpusError, match=r"language 'fr' is missing .*trilingual\.csv.*\['id', 'en', 'es', 'hi'\]"):
        load_parallel_dataset(cfg)


def test_parquet_and_folder_of_files(tmp_path):
    folder = tmp_path / "parquet_dir"
    folder.mkdir()
    datasets.Dataset.from_dict({"en": ["One.", "Two."], "hi": ["एक।", "दो।"]}).to_parquet(
        str(folder / "part-0.parquet"))
    datasets.Dataset.from_dict({"en": ["Three."], "hi": ["तीन।"]}).to_parquet(
        str(folder / "part-1.parquet"))
    cfg = config(tmp_path, kind="parallel", name="pq", path=str(folder), layout="columns",
                 languages=["en", "hi"])
    corpus = load_parallel_dataset(cfg)
    assert corpus.texts["en"] == ["One.", "Two.", "Three."]
    assert corpus.texts["hi"] == ["एक।", "दो।", "तीन।"]


# ------------------------------------------------------------------ FLORES+ layout

FLORES = {
    "eng_Latn": ["On Monday, scientists announced a new test.", "The rain fell all night.",
                 "He was born in 1950."],
    "spa_Latn": ["El lunes, los científicos anunciaron una nueva prueba.",
                 "La lluvia cayó toda la noche.", "Nació en 1950."],
    "hin_Deva": ["सोमवार को, वैज्ञानिकों ने एक नए परीक्षण की घोषणा की।", "सारी रात बारिश होती रही।",
                 "उनका जन्म 1950 में हुआ था।"],
}
FLORES_CODES = {"en": "eng_Latn", "es": "spa_Latn", "hi": "hin_Deva"}


def flores_rows(code, order=(0, 1, 2)):
    iso_639_3, iso_15924 = code.split("_")
    return [{"id": i + 1, "iso_639_3": iso_639_3, "iso_15924": iso_15924,
             "text": FLORES[code][i], "topic": f"topic-{i}"} for i in order]


def flores_config(tmp_path, path, **fields):
    fields.setdefault("language_codes", FLORES_CODES)
    return config(tmp_path, kind="parallel", name="flores", path=str(path), layout="flores_plus",
                  **fields)


@pytest.fixture
def flores_dir(tmp_path):
    folder = tmp_path / "flores_plus" / "dev"
    write_jsonl(folder / "eng_Latn.jsonl", flores_rows("eng_Latn"))
    write_jsonl(folder / "spa_Latn.jsonl", flores_rows("spa_Latn", order=(2, 0, 1)))  # other order
    write_jsonl(folder / "hin_Deva.jsonl", flores_rows("hin_Deva", order=(1, 2, 0)))
    return folder


def test_flores_folder_aligned_by_id(tmp_path, flores_dir):
    corpus = load_parallel_dataset(flores_config(tmp_path, flores_dir))
    assert corpus.ids == ["1", "2", "3"]  # the reference (English) file's order
    assert corpus.texts["en"][1] == "The rain fell all night."
    assert corpus.texts["es"][1] == "La lluvia cayó toda la noche."
    assert corpus.texts["hi"][1] == "सारी रात बारिश होती रही।"
    assert corpus.texts["hi"][0] == "सोमवार को, वैज्ञानिकों ने एक नए परीक्षण की घोषणा की।"
    assert corpus.topics == ["topic-0", "topic-1", "topic-2"]


def test_flores_prefers_the_hf_split_folder(tmp_path, flores_dir):
    devtest = flores_dir.parent / "devtest"
    for code in FLORES:
        write_jsonl(devtest / f"{code}.jsonl", flores_rows(code, order=(2,)))
    corpus = load_parallel_dataset(flores_config(tmp_path, flores_dir.parent, hf_split="devtest"))
    assert corpus.texts["es"] == ["Nació en 1950."]
    corpus = load_parallel_dataset(flores_config(tmp_path, flores_dir.parent, hf_split="dev"))
    assert len(corpus) == 3


def test_flores_single_file_with_iso_columns(tmp_path):
    rows = flores_rows("hin_Deva") + flores_rows("eng_Latn") + flores_rows("spa_Latn")
    path = write_jsonl(tmp_path / "flores_all.jsonl", rows)
    corpus = load_parallel_dataset(flores_config(tmp_path, path, languages=["en", "hi"]))
    assert corpus.languages == ["en", "hi"]
    assert corpus.texts["hi"][2] == "उनका जन्म 1950 में हुआ था।"
    assert corpus.texts["en"][2] == "He was born in 1950."


def test_flores_ids_not_matching(tmp_path, flores_dir):
    write_jsonl(flores_dir / "spa_Latn.jsonl", flores_rows("spa_Latn", order=(0, 1)))
    with pytest.raises(CorpusError, match=r"ids of 'es' \(spa_Latn\) do not match 'en'.*1 missing \(e\.g\. \['3'\]\)"):
        load_parallel_dataset(flores_config(tmp_path, flores_dir))


def test_flores_language_missing(tmp_path, flores_dir):
    cfg = flores_config(tmp_path, flores_dir, languages=["en", "fr"],
                        language_codes={**FLORES_CODES, "fr": "fra_Latn"})
    with pytest.raises(CorpusError, match=r"language 'fr' \(as 'fra_Latn'\) is missing .*\['eng_Latn', 'hin_Deva', 'spa_Latn'\]"):
        load_parallel_dataset(cfg)


# ------------------------------------------------------------------ files layout


def test_files_layout_line_aligned(tmp_path):
    # Moses / OPUS plain files are named by language, not .txt.
    en = write_lines(tmp_path / "corpus.en-hi.en",
                     ["Good night.", "See you tomorrow.", "Untranslated line.", "Thanks!"])
    hi = write_lines(tmp_path / "corpus.en-hi.hi", ["शुभ रात्रि।", "कल मिलते हैं।", "", "धन्यवाद!"])
    cfg = config(tmp_path, kind="parallel", name="moses", layout="files", languages=["en", "hi"],
                 files={"en": str(en), "hi": str(hi)})
    corpus = load_parallel_dataset(cfg)
    assert len(corpus) == 3  # the pair with an empty Hindi line is dropped
    assert corpus.texts["hi"][1] == "कल मिलते हैं।"
    assert corpus.texts["en"][2] == "Thanks!"
    assert corpus.ids == ["moses-0", "moses-1", "moses-3"]  # ids keep the line number


def test_files_layout_mismatched_line_counts(tmp_path):
    en = write_lines(tmp_path / "en.txt", ["one", "two", "three"])
    es = write_lines(tmp_path / "es.txt", ["uno", "dos"])
    cfg = config(tmp_path, kind="parallel", name="moses", layout="files", languages=["en", "es"],
                 files={"en": str(en), "es": str(es)})
    with pytest.raises(CorpusError, match=r"not line-aligned.*en\.txt' has 3 lines.*es\.txt' has 2 lines"):
        load_parallel_dataset(cfg)


def test_files_layout_language_missing(tmp_path):
    en = write_lines(tmp_path / "en.txt", ["one"])
    cfg = config(tmp_path, kind="parallel", name="moses", layout="files", languages=["en", "hi"],
                 files={"en": str(en)})
    with pytest.raises(CorpusError, match=r"\['hi'\] missing from the `files`.*has files for \['en'\]"):
        load_parallel_dataset(cfg)


# ------------------------------------------------------------------ text datasets


def test_text_jsonl(tmp_path):
    rows = [{"content": f"Document {i} is about topic {i % 7}.", "meta": i} for i in range(100)]
    rows[5]["content"] = "  "
    path = write_jsonl(tmp_path / "web.jsonl", rows)
    cfg = config(tmp_path, kind="text", name="web", path=str(path), text_column="content",
                 language="es")
    docs = load_text_dataset(cfg)
    assert len(docs) == 99
    assert [d.doc_id for d in docs] == list(range(99))
    assert docs[5].text == "Document 6 is about topic 6."
    assert {d.language for d in docs} == {"es"}
    assert {d.pair_id for d in docs} == {-1}
    assert {d.source for d in docs} == {"web"}
    assert {d.split for d in docs} == set(SPLITS)
    assert [d.split for d in load_text_dataset(cfg)] == [d.split for d in docs]

    evaluation = load_text_dataset(config(tmp_path, kind="text", name="web", path=str(path),
                                          text_column="content", splits=["evaluation"]))
    assert [d.text for d in evaluation] == [d.text for d in docs if d.split == "evaluation"]
    assert [d.doc_id for d in evaluation] == list(range(len(evaluation)))
    few = load_text_dataset(config(tmp_path, kind="text", name="web", path=str(path),
                                   text_column="content", max_items=5))
    assert len(few) == 5 and {d.text for d in few} <= {d.text for d in docs}


def test_text_txt_one_document_per_line(tmp_path):
    path = write_lines(tmp_path / "notes.txt", ["यह पहला वाक्य है।", "", "Second line."])
    docs = load_text_dataset(config(tmp_path, kind="text", name="notes", path=str(path),
                                    language="hi"))
    assert [d.text for d in docs] == ["यह पहला वाक्य है।", "Second line."]
    assert [d.doc_id for d in docs] == [0, 1]


def test_text_column_missing(tmp_path):
    path = write_jsonl(tmp_path / "web.jsonl", [{"content": "hello", "url": "x"}])
    cfg = config(tmp_path, kind="text", name="web", path=str(path), text_column="body")
    with pytest.raises(CorpusError, match=r"'body' does not exist .*available columns: \['content', 'url'\]"):
        load_text_dataset(cfg)


# ------------------------------------------------------------------ other errors


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(CorpusError, match=r"empty\.jsonl' is empty"):
        load_parallel_dataset(opus_config(tmp_path, path))
    with pytest.raises(CorpusError, match=r"empty\.jsonl' is empty"):
        load_text_dataset(config(tmp_path, kind="text", path=str(path)))


def test_all_translations_empty(tmp_path):
    rows = [{"translation": {"en": "Hello.", "es": " "}}, {"translation": {"en": "", "es": "Hola."}}]
    path = write_jsonl(tmp_path / "blank.jsonl", rows)
    with pytest.raises(CorpusError, match=r"blank\.jsonl' is empty: all 2 pairs have an empty"):
        load_parallel_dataset(opus_config(tmp_path, path))


def test_all_texts_empty(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(CorpusError, match=r"blank\.jsonl' is empty: all 2 rows have empty text"):
        load_text_dataset(config(tmp_path, kind="text", path=str(path)))


def test_unknown_layout(tmp_path, opus_file):
    cfg = opus_config(tmp_path, opus_file)
    cfg.layout = "tmx"
    with pytest.raises(CorpusError, match=r"unknown parallel layout 'tmx'.*'translation', 'columns', 'flores_plus', 'files'"):
        load_parallel_dataset(cfg)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "corpus.xlsx"
    path.write_text("not really a spreadsheet")
    with pytest.raises(CorpusError, match=r"unsupported file suffix '\.xlsx'.*\.jsonl"):
        load_text_dataset(config(tmp_path, kind="text", path=str(path)))


def test_local_path_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere" / "data.jsonl"
    with pytest.raises(CorpusError, match=r"data\.jsonl' does not exist"):
        load_text_dataset(config(tmp_path, kind="text", path=str(missing)))


def test_unknown_split_name(tmp_path, opus_file):
    with pytest.raises(CorpusError, match=r"unknown splits \['train'\]"):
        load_parallel_dataset(opus_config(tmp_path, opus_file, splits=["train"]))


def test_hub_id_offline_is_a_clear_error(tmp_path):
    cfg = config(tmp_path, kind="parallel", name="opus", path="Helsinki-NLP/opus-100",
                 subset="en-es", layout="translation", languages=["en", "es"])
    with pytest.raises(CorpusError, match=r"could not load dataset 'Helsinki-NLP/opus-100' \(subset 'en-es'"):
        load_parallel_dataset(cfg)


# ------------------------------------------------------------------ other inputs


def test_tsv_columns(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("en\tes\nA dog, a cat.\tUn perro, un gato.\n", encoding="utf-8")
    cfg = config(tmp_path, kind="parallel", name="tsv", path=str(path), layout="columns",
                 languages=["en", "es"])
    assert load_parallel_dataset(cfg).texts == {"en": ["A dog, a cat."], "es": ["Un perro, un gato."]}


def test_hydra_structured_config(tmp_path, flores_dir):
    # The apps pass an OmegaConf DictConfig, not the dataclass itself.
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(flores_config(tmp_path, flores_dir, splits=list(SPLITS)))
    corpus = load_parallel_dataset(cfg)
    assert corpus.texts["es"][0] == "El lunes, los científicos anunciaron una nueva prueba."
