"""Write an activation cache: one forward per batch for all sites, sharded, atomic, resumable.

Layout of a cache directory::

    manifest.json              config + hash, sites, widths, dtype, shard list with checksums
    documents.jsonl            doc_id, pair_id, language, split, source, text
    meta/00000.npy ...         per-token records (META_DTYPE): token id, doc id, position, ...
    layers.6.resid/00000.npy   (n_tokens, width) activations; bf16 stored as its int16 bits

Batches are a deterministic function of the config, so a run killed at any point resumes from
the last finished shard (recomputing at most one batch) and ends byte-identical to a run that was
never interrupted, but for the last bit of a few bf16 activations of that recomputed batch
(seen in 2 of ~30 runs: the CPU's bf16 kernels are not bit-reproducible across processes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_train.cache.capture import capture_sites, run_capture
from sae_train.cache.lock import CacheLock
from sae_train.cache.manifest import (FORMAT_VERSION, META_DTYPE, MANIFEST_NAME, CacheError,
                                      atomic_save_npy, atomic_write_bytes, atomic_write_json,
                                      config_hash, diff_configs, is_temp_name, read_manifest)
from sae_train.corpora.types import SPLITS, Document
from sae_train.models.sites import Site

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _Context:
    """One model input: a document (or a window of a long one) as token ids."""

    doc_index: int
    ids: list[int]
    keep: np.ndarray  # bool per token: stored (not a special token)


def _windows(ids: list[int], special: set[int], max_length: int) -> list[list[int]]:
    """Split a tokenised document into windows of at most ``max_length``, each keeping the
    document's leading/trailing special tokens (BOS) so every window looks like a document."""
    if len(ids) <= max_length:
        return [ids]
    lead = 0
    while lead < len(ids) and ids[lead] in special:
        lead += 1
    trail = 0
    while trail < len(ids) - lead and ids[len(ids) - 1 - trail] in special:
        trail += 1
    body = ids[lead:len(ids) - trail]
    step = max_length - lead - trail
    if step <= 0:
        raise ValueError(f"cache.max_length={max_length} leaves no room for text tokens")
    return [ids[:lead] + body[i:i + step] + ids[len(ids) - trail:]
            for i in range(0, len(body), step)]


def plan_contexts(docs: list[Document], tokenizer, max_length: int,
                  sort_by_length: bool = True) -> list[_Context]:
    special = set(tokenizer.all_special_ids)
    encoded = tokenizer([d.text for d in docs], add_special_tokens=True)["input_ids"]
    contexts = []
    for index, ids in enumerate(encoded):
        for window in _windows(list(ids), special, max_length):
            keep = np.array([t not in special for t in window], dtype=bool)
            if keep.any():
                contexts.append(_Context(index, window, keep))
    if sort_by_length:
        # Longest first: similar lengths share a batch (little padding) and an out-of-memory
        # batch size fails at once rather than at the end.
        contexts.sort(key=lambda c: -len(c.ids))
    return contexts


def _documents_fingerprint(docs: list[Document]) -> str:
    digest = hashlib.sha256()
    for d in docs:
        digest.update(json.dumps([d.doc_id, d.text, d.language, d.split, d.pair_id]).encode())
    return digest.hexdigest()[:16]


def _to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    x = x.to(STORAGE_DTYPES[dtype])
    if dtype == "bfloat16":  # numpy has no bfloat16: keep the bits
        x = x.view(torch.int16)
    return x.cpu().numpy()


class _ShardBuffer:
    """Accumulates per-batch arrays and cuts them into fixed-size shards."""

    def __init__(self, names: list[str]):
        self.parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        self.size = 0

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        for name, arr in arrays.items():
            self.parts[name].append(arr)
        self.size += len(arrays["meta"])

    def take(self, n: int) -> dict[str, np.ndarray]:
        out = {}
        for name, parts in self.parts.items():
            joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
            out[name] = joined[:n]
            self.parts[name] = [joined[n:]] if len(joined) > n else []
        self.size -= n
        return out


class _BackgroundShardWriter:
    """Writes finished shards on a thread, in order, so disk I/O overlaps the next forward.

    The manifest lists a shard only after all of its files are on disk, so a kill at any
    moment leaves a consistent cache. At most ``max_pending`` shards wait in memory.
    """

    def __init__(self, out: Path, manifest: dict, names: list[str], on_shard=None,
                 max_pending: int = 1):
        self.out, self.manifest, self.names, self.on_shard = out, manifest, names, on_shard
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="shard-writer")
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.error is not None:
                continue  # drain after a failure; the main thread re-raises it
            try:
                self._write(*job)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                self.error = err

    def _write(self, arrays: dict[str, np.ndarray], batch: int, offset: int) -> None:
        index = len(self.manifest["shards"])
        files = {}
        for name in self.names:
            rel = f"{name}/{index:05d}.npy"
            files[name] = {"path": rel, "sha256": atomic_save_npy(self.out / rel, arrays[name])}
        n = len(arrays["meta"])
        self.manifest["shards"].append({"index": index, "n_tokens": n, "end_batch": batch,
                                        "end_offset": offset, "files": files})
        self.manifest["n_tokens"] += n
        atomic_write_json(self.out / MANIFEST_NAME, self.manifest)  # only now does it count
        if self.on_shard is not None:
            self.on_shard(index)

    def submit(self, arrays: dict[str, np.ndarray], batch: int, offset: int) -> None:
        self._raise_if_failed()
        self.queue.put((arrays, batch, offset))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise CacheError(f"writing a shard under {self.out} failed: {self.error}") \
                from self.error


def pad_contexts(batch: list[_Context], pad_id: int):
    """Left-pad contexts into ``(ids, attention_mask, keep)`` tensors of shape (batch, length);
    ``keep`` marks the tokens that are stored (real, non-special)."""
    length = max(len(c.ids) for c in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), length), dtype=torch.long)
    keep = torch.zeros((len(batch), length), dtype=torch.bool)
    for row, c in enumerate(batch):
        ids[row, length - len(c.ids):] = torch.tensor(c.ids)
        attn[row, length - len(c.ids):] = 1
        keep[row, length - len(c.ids):] = torch.from_numpy(c.keep)
    return ids, attn, keep


def _batch_arrays(model, store, batch: list[_Context], docs: list[Document], sites: list[Site],
                  dtype: str, pad_id: int, device, lang_index: dict, split_index: dict,
                  n_stored: int) -> dict[str, np.ndarray]:
    """Run one left-padded batch and return the stored tokens' metadata and activations."""
    ids, attn, keep = pad_contexts(batch, pad_id)
    length = ids.shape[1]
    acts = run_capture(model, store, ids.to(device), attn.to(device))
    keep_dev = keep.to(device)
    rows, cols = keep.nonzero(as_tuple=True)
    row_docs = [docs[batch[r].doc_index] for r in rows.tolist()]
    pads = length - torch.tensor([len(c.ids) for c in batch])
    meta = np.zeros(n_stored, dtype=META_DTYPE)
    meta["token_id"] = ids[rows, cols].numpy()
    meta["doc_id"] = [d.doc_id for d in row_docs]
    meta["position"] = (cols - pads[rows]).numpy()
    meta["language"] = [lang_index[d.language] for d in row_docs]
    meta["split"] = [split_index[d.split] for d in row_docs]
    arrays = {"meta": meta}
    for site in sites:
        arrays[site.name] = _to_storage(acts[site.name][keep_dev], dtype)
    return arrays


def validate_cache_options(dtype: str, shard_tokens: int, batch_size: int, max_length: int,
                           max_tokens: int | None) -> None:
    """Raise ValueError naming the first out-of-range option (before anything is written)."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"cache.dtype={dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
    for name, value, low in (("shard_tokens", shard_tokens, 1), ("batch_size", batch_size, 1),
                             ("max_length", max_length, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"cache.{name}={value!r}: must be an integer ≥ {low}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise ValueError(f"cache.max_tokens={max_tokens!r}: must be an integer ≥ 1, or null for "
                         "the whole corpus")


def _cache_config(docs, sites, provenance, options: dict) -> dict:
    return {"provenance": provenance or {}, "documents": _documents_fingerprint(docs),
            "sites": [s.name for s in sites], "cache": options}


def _open_manifest(out: Path, config: dict) -> dict | None:
    """The manifest already in ``out`` (None if new); refuses one made with another config."""
    manifest = read_manifest(out)
    if manifest is not None and manifest["config_hash"] != config_hash(config):
        diffs = diff_configs(manifest["config"], config)
        raise CacheError(
            f"{out} already holds a cache made with a different config; differing keys:\n  "
            + "\n  ".join(diffs) + "\nUse another cache.dir or delete the old cache."
        )
    return manifest


def _new_manifest(out: Path, config: dict, docs: list[Document], sites: list[Site],
                  total: int) -> dict:
    """Write documents.jsonl and an empty manifest (no shard yet) for a new cache."""
    dtype = config["cache"]["dtype"]
    manifest = {
        "format_version": FORMAT_VERSION, "config_hash": config_hash(config), "config": config,
        "sites": [{"name": s.name, "layer": s.layer, "kind": s.kind, "width": s.width}
                  for s in sites],
        "dtype": dtype, "storage_dtype": "int16" if dtype == "bfloat16" else dtype,
        "languages": list(dict.fromkeys(d.language for d in docs)), "splits": list(SPLITS),
        "shard_tokens": config["cache"]["shard_tokens"],
        "total_tokens": total, "n_tokens": 0, "shards": [], "complete": False,
    }
    doc_lines = "".join(json.dumps({"doc_id": d.doc_id, "pair_id": d.pair_id,
                                    "language": d.language, "split": d.split,
                                    "source": d.source, "text": d.text},
                                   ensure_ascii=False) + "\n" for d in docs)
    atomic_write_bytes(out / "documents.jsonl", doc_lines.encode())
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


def remove_unfinished_files(out: Path, manifest: dict | None, names: list[str]) -> list[Path]:
    """Delete what a killed run left behind in ``out``: temp files of atomic writes and shard
    files the manifest does not list, in the cache's own folders (``names``: meta and the
    sites) only. Returns the removed paths."""
    listed = {f["path"] for shard in (manifest or {}).get("shards", [])
              for f in shard["files"].values()}
    candidates = [p for p in out.glob(".*") if p.name.startswith((".manifest.json.",
                                                                  ".documents.jsonl."))]
    for name in names:
        candidates += [p for p in (out / name).glob("*") if is_temp_name(p.name)
                       or (p.suffix == ".npy" and f"{name}/{p.name}" not in listed)]
    removed = [p for p in sorted(candidates) if p.is_file()]
    for path in removed:
        path.unlink()
    if removed:
        log.info("removed %d unfinished file(s) of an interrupted run in %s", len(removed), out)
    return removed


@dataclass
class _Plan:
    """The deterministic batches of a cache run and where it (re)starts."""

    batches: list[list[_Context]]
    per_batch: list[int]
    total: int
    start_batch: int = 0
    skip: int = 0


def _plan(docs, tokenizer, max_length: int, batch_size: int, max_tokens: int | None,
          sort_by_length: bool) -> _Plan:
    contexts = plan_contexts(docs, tokenizer, max_length, sort_by_length)
    batches = [contexts[i:i + batch_size] for i in range(0, len(contexts), batch_size)]
    per_batch = [int(sum(c.keep.sum() for c in b)) for b in batches]
    available = int(sum(per_batch))
    if available == 0:
        raise CacheError(f"the corpus has no tokens to cache ({len(docs)} documents, all empty "
                         "or special tokens); check data.*")
    total = available if max_tokens is None else min(available, max_tokens)
    return _Plan(batches, per_batch, total)


def _fill_shards(model, tokenizer, docs, sites, out: Path, manifest: dict, plan: _Plan,
                 dtype: str, shard_tokens: int, progress: bool) -> None:
    """Run the remaining batches and hand finished shards to the background writer."""
    device = next(model.parameters()).device
    lang_index = {lang: i for i, lang in enumerate(manifest["languages"])}
    split_index = {s: i for i, s in enumerate(SPLITS)}
    names = ["meta"] + [s.name for s in sites]
    buffer = _ShardBuffer(names)
    handed_over = manifest["n_tokens"]  # tokens already given to the shard writer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=plan.total, initial=handed_over, unit="tok", unit_scale=True,
               disable=not progress, desc=f"caching {len(sites)} site(s)", dynamic_ncols=True)
    writer = _BackgroundShardWriter(out, manifest, names,
                                    on_shard=lambda i: bar.set_postfix(shards=i + 1))

    def flush(n: int, batch: int, offset: int) -> None:
        nonlocal handed_over
        writer.submit(buffer.take(n), batch, offset)
        handed_over += n

    try:
        with capture_sites(model, sites) as store:
            for b in range(plan.start_batch, len(plan.batches)):
                budget = plan.total - handed_over - buffer.size
                if budget <= 0:
                    break
                arrays = _batch_arrays(model, store, plan.batches[b], docs, sites, dtype, pad_id,
                                       device, lang_index, split_index, plan.per_batch[b])
                first = plan.skip if b == plan.start_batch else 0
                last = min(plan.per_batch[b], first + budget)
                buffer.append({k: v[first:last] for k, v in arrays.items()})
                bar.update(last - first)
                while buffer.size >= shard_tokens:
                    flush(shard_tokens, b, last - (buffer.size - shard_tokens))
                if handed_over + buffer.size >= plan.total and buffer.size > 0:
                    flush(buffer.size, b, last)
    finally:
        writer.close()
        bar.close()


def write_activation_cache(model, tokenizer, docs: list[Document], sites: list[Site],
                           out_dir: str | Path, *, dtype: str = "bfloat16",
                           shard_tokens: int = 16384, batch_size: int = 16,
                           max_length: int = 128, max_tokens: int | None = None,
                           sort_by_length: bool = True, provenance: dict | None = None,
                           progress: bool = True) -> dict:
    """Cache activations of ``docs`` at ``sites`` into ``out_dir``; resume if it was started.

    ``provenance`` (model/tokenizer/data identity) is part of the config hash: a different
    model, tokenizer, corpus, site list or cache setting in the same directory is refused.
    Holds the directory's write lock (:class:`CacheLock`) throughout. Returns the final manifest.
    """
    validate_cache_options(dtype, shard_tokens, batch_size, max_length, max_tokens)
    if not sites:
        raise ValueError("no sites to cache")
    out = Path(out_dir)
    config = _cache_config(docs, sites, provenance, {
        "dtype": dtype, "shard_tokens": shard_tokens, "batch_size": batch_size,
        "max_length": max_length, "max_tokens": max_tokens, "sort_by_length": sort_by_length})
    if out.exists() and not out.is_dir():
        raise CacheError(f"cache.dir={str(out)!r} is a file, not a directory")
    with CacheLock(out):
        manifest = _open_manifest(out, config)
        if manifest is not None and manifest.get("complete"):
            log.info("cache at %s is complete (%d tokens); nothing to do", out,
                     manifest["n_tokens"])
            return manifest
        plan = _plan(docs, tokenizer, max_length, batch_size, max_tokens, sort_by_length)
        remove_unfinished_files(out, manifest, ["meta"] + [s.name for s in sites])
        if manifest is None:
            manifest = _new_manifest(out, config, docs, sites, plan.total)
        elif manifest["shards"]:
            # Resume point: the batch in which the last finished shard ended, minus its part.
            last = manifest["shards"][-1]
            plan.start_batch, plan.skip = last["end_batch"], last["end_offset"]
            log.info("resuming %s after shard %d (%d/%d tokens)", out, last["index"],
                     manifest["n_tokens"], plan.total)
        _fill_shards(model, tokenizer, docs, sites, out, manifest, plan, dtype, shard_tokens,
                     progress)
        if manifest["n_tokens"] != plan.total:
            raise CacheError(f"cache at {out}: wrote {manifest['n_tokens']} tokens, expected "
                             f"{plan.total}")
        manifest["complete"] = True
        atomic_write_json(out / MANIFEST_NAME, manifest)
        return manifest
