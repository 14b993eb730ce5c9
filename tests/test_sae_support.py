"""Shared pieces of the SAE tests (no tests here): a small real activation cache of the tiny Llama,
running the real `sae-train` Hydra app in-process, and reading what it wrote.

Imported by the other tests/test_sae_*.py modules (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import csv
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SITES = ["layers.1.resid", "layers.2.mlp"]
# Small enough to train in seconds, big enough that SAEs learn: ~21k tokens, ~4k held out.
DOCS_STRIDE = 3


def build_tiny_cache(load_tiny, root: Path) -> Path:
    """The tiny Llama's activations at SITES over every third embedded document (bf16), built
    once per test session (a complete cache is reused as is)."""
    from sae_train.cache.writer import write_activation_cache
    from sae_train.corpora.embedded import embedded_documents
    from sae_train.models.sites import resolve_sites

    path = root / "sae-tiny-llama-cache"
    model, tokenizer, info = load_tiny("llama")
    docs = embedded_documents()[::DOCS_STRIDE]
    provenance = {"model": {"name": "tiny:llama", "fingerprint": info.fingerprint,
                            "dtype": "float32"}}
    write_activation_cache(model, tokenizer, docs, resolve_sites(model, SITES), path,
                           dtype="bfloat16", shard_tokens=4096, batch_size=32,
                           provenance=provenance, progress=False)
    return path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small SAE steps run ~5x faster on one thread on the 2-core CI machine (waking a second
    OpenMP thread costs more than these ops); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_cache(load_tiny, tmp_path_factory) -> Path:
    return build_tiny_cache(load_tiny, tmp_path_factory.getbasetemp())


# Overrides that make a run small and quiet; tests add their own after these.
FAST = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "loader.batch_size=512", "loader.stats_tokens=4096", "sae.n_latents=256",
        "optim.warmup_steps=10", "metrics.every_n_steps=10", "trainer.log_every_n_steps=5"]


def run_app(monkeypatch, args: list[str]) -> None:
    """`sae-train <args>` in this process (the real Hydra entry point); errors propagate."""
    from sae_train.apps import train_app

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(sys, "argv", ["sae-train", *args])
    train_app.main()


def csv_metrics(out_dir: Path) -> list[dict[str, str]]:
    files = sorted(Path(out_dir).glob("csv/version_*/metrics.csv"))
    assert files, f"no metrics.csv under {out_dir}"
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


def last_value(rows: list[dict[str, str]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    assert values, f"{key} was never logged; logged keys: {sorted(rows[0])}"
    return values[-1]


def site_rows(cache_dir: Path, site: str, splits: list[str]) -> torch.Tensor:
    """All rows of ``site`` in ``splits`` as float32, read directly from the cache."""
    from sae_train.cache.reader import ActivationCache

    cache = ActivationCache(cache_dir)
    return cache.gather(site, np.asarray(cache.select(splits))).to(torch.float32)


def fvu(x: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Σ‖x − x̂‖² / Σ‖x − x̄‖², float64, written out independently of the library."""
    x, reconstruction = x.double(), reconstruction.double()
    return float(((x - reconstruction) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline wandb run, read from its ``run-*.wandb`` file.

    The file is wandb's record log: a 7-byte header, then LevelDB-log framing (32 KiB blocks;
    each chunk has a 7-byte header: crc32, length, type 1=full 2=first 3=middle 4=last) around
    serialised ``wandb_internal_pb2.Record`` messages.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    data = path.read_bytes()
    block, pos, chunks, rows = 32768, 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:
            pos += (block - pos % block) % block
            continue
        chunks.append(data[pos:pos + length])
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
