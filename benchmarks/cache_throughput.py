"""Caching throughput vs the bare forward pass, and reader throughput from the memory map.

    python benchmarks/cache_throughput.py                       # demo model, all resid sites
    python benchmarks/cache_throughput.py --model tiny_llama    # seconds, for a smoke run

Both paths see the same batches (same documents, same left padding). The reference is the
decoder body's plain forward (``model.model``: every layer, no LM head, no hooks); caching adds
the hooks, the gather of stored tokens, dtype conversion and the atomic shard writes.
Runs alternate (reference, cache, reference, cache, ...) and the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir  # noqa: E402

from sae_train.apps import config_dir  # noqa: E402
from sae_train.cache.capture import left_padded_position_ids  # noqa: E402
from sae_train.cache.datamodule import CachedActivationBatches  # noqa: E402
from sae_train.cache.reader import ActivationCache  # noqa: E402
from sae_train.cache.writer import pad_contexts, plan_contexts, write_activation_cache  # noqa: E402
from sae_train.config import register_configs  # noqa: E402
from sae_train.corpora import load_documents  # noqa: E402
from sae_train.models.loading import load_model  # noqa: E402
from sae_train.models.sites import decoder_layers, resolve_sites  # noqa: E402


def bare_forward(model, tokenizer, docs, batch_size, max_length) -> tuple[float, int]:
    """Seconds and stored-token count of a plain forward over the cache's own batches."""
    contexts = plan_contexts(docs, tokenizer, max_length)
    pad = tokenizer.pad_token_id or 0
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(contexts), batch_size):
            batch = contexts[i:i + batch_size]
            ids, attn, _ = pad_contexts(batch, pad)
            body(input_ids=ids, attention_mask=attn,
                 position_ids=left_padded_position_ids(attn), use_cache=False)
            tokens += int(sum(c.keep.sum() for c in batch))
    return time.perf_counter() - start, tokens


def reader_throughput(cache_dir: Path, site: str, batch: int, epochs: int) -> tuple[float, float]:
    """GB/s of shuffled batches (no prefetch: the raw gather) and of one sequential pass."""
    cache = ActivationCache(cache_dir)
    row_bytes = cache.width(site) * (2 if cache.dtype != "float32" else 4)
    data = CachedActivationBatches(cache, [site], np.arange(cache.n_tokens), batch, prefetch=0)
    for _ in data:  # warm the page cache
        pass
    start = time.perf_counter()
    rows = 0
    for _ in range(epochs):
        for b in data:
            rows += len(b["index"])
    shuffled = rows * row_bytes / (time.perf_counter() - start) / 1e9
    start = time.perf_counter()
    total = sum(np.array(x).nbytes for x in cache._memmaps(site))  # copies every byte
    sequential = total / (time.perf_counter() - start) / 1e9
    return shuffled, sequential


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3_270m", help="a conf/model/*.yaml name")
    parser.add_argument("--sites", default="layers.*.resid")
    parser.add_argument("--docs", type=int, default=320, help="documents per timed run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="model dtype override")
    args = parser.parse_args()

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        overrides = [f"model={args.model}"] + ([f"model.dtype={args.dtype}"] if args.dtype else [])
        cfg = compose("cache", overrides=overrides)
    torch.manual_seed(0)
    model, tokenizer, info = load_model(cfg.model)
    sites = resolve_sites(model, args.sites)
    docs = load_documents(cfg.data)[: args.docs]
    print(f"model {info.name} ({info.dtype}, {len(decoder_layers(model))} layers), "
          f"{len(sites)} sites, {len(docs)} docs, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")

    bare_times, cache_times, tokens = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            seconds, tokens = bare_forward(model, tokenizer, docs, args.batch_size,
                                           cfg.cache.max_length)
            bare_times.append(seconds)
            out = Path(tmp) / f"cache{r}"
            start = time.perf_counter()
            manifest = write_activation_cache(model, tokenizer, docs, sites, out,
                                              batch_size=args.batch_size, progress=False)
            cache_times.append(time.perf_counter() - start)
            assert manifest["n_tokens"] == tokens
        bare, cached = statistics.median(bare_times), statistics.median(cache_times)
        size = sum(f.stat().st_size for f in (Path(tmp) / "cache0").rglob("*.npy"))
        shuffled, sequential = reader_throughput(Path(tmp) / "cache0", sites[-1].name, 8192, 3)

    print()
    print("| path | tokens | seconds (median) | tokens/s | vs bare |")
    print("|---|---|---|---|---|")
    print(f"| bare forward (decoder body, no hooks) | {tokens} | {bare:.2f} | "
          f"{tokens / bare:,.0f} | 1.00 |")
    print(f"| sae-cache ({len(sites)} sites, {cfg.cache.dtype}, to disk) | {tokens} | "
          f"{cached:.2f} | {tokens / cached:,.0f} | {cached / bare:.2f}× time "
          f"(+{100 * (cached / bare - 1):.1f}%) |")
    print()
    print(f"cache size on disk: {size / 1e6:.1f} MB")
    print("| reader (one site, page cache) | GB/s |")
    print("|---|---|")
    print(f"| shuffled batches of 8192 tokens (gather from memmap) | {shuffled:.2f} |")
    print(f"| sequential read of every shard | {sequential:.2f} |")


if __name__ == "__main__":
    main()
