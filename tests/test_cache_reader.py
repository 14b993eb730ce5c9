"""The cache reader: shuffling, DDP-disjoint sharding (real gloo processes), prefetch, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_train.cache.datamodule import (ActivationDataModule, CachedActivationBatches,
                                        rank_token_order)
from sae_train.cache.reader import ActivationCache
from sae_train.cache.writer import write_activation_cache
from sae_train.corpora.embedded import embedded_documents
from sae_train.models.sites import resolve_sites


@pytest.fixture(scope="module")
def small_cache(load_tiny, tmp_path_factory):
    model, tokenizer, _ = load_tiny("llama")
    path = tmp_path_factory.mktemp("reader") / "cache"
    docs = embedded_documents(splits=["tuning", "evaluation"])
    write_activation_cache(model, tokenizer, docs, resolve_sites(model, ["layers.1.resid",
                                                                         "layers.2.mlp"]),
                           path, dtype="float32", shard_tokens=1000, progress=False)
    return path


def _ddp_worker(rank: int, world: int, port: int, cache_dir: str, out: dict):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        dm = ActivationDataModule(cache_dir, ["layers.1.resid", "layers.2.mlp"], batch_size=97,
                                  drop_last=False, prefetch=2, seed=3)
        dm.setup("fit")  # no trainer attached: rank and world come from torch.distributed
        indices, n_batches = [], 0
        cache = ActivationCache(cache_dir)
        for batch in dm.train_dataloader():
            idx = batch["index"].numpy()
            # Sites stay aligned by token: rows are exactly the cache rows of `index`.
            assert torch.equal(batch["layers.1.resid"], cache.gather("layers.1.resid", idx))
            indices.append(idx)
            n_batches += 1
        out[rank] = (np.concatenate(indices), n_batches)
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_read_disjoint_tokens_covering_the_cache(small_cache):
    cache = ActivationCache(small_cache)
    port = 29500 + np.random.default_rng().integers(0, 2000)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, int(port), str(small_cache), out), nprocs=2, join=True)
        (idx0, nb0), (idx1, nb1) = out[0], out[1]
    assert nb0 == nb1  # DDP needs the same number of steps on every rank
    assert len(np.intersect1d(idx0, idx1)) == 0
    union = np.union1d(idx0, idx1)
    assert len(union) == len(idx0) + len(idx1) == cache.n_tokens
    np.testing.assert_array_equal(union, np.arange(cache.n_tokens))


@pytest.mark.parametrize("n,world,batch", [(201, 2, 100), (1000, 3, 64), (7, 4, 2)])
def test_rank_partitions_have_equal_batch_counts(small_cache, n, world, batch):
    cache = ActivationCache(small_cache)
    seen, counts = [], []
    for rank in range(world):
        data = CachedActivationBatches(cache, ["layers.1.resid"], np.arange(n), batch, rank=rank,
                                       world_size=world, drop_last=False, block_tokens=16)
        batches = data.epoch_batches(0)
        counts.append(len(batches))
        seen.append(np.concatenate(batches))
    assert len(set(counts)) == 1
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(n))


def test_shuffle_is_seeded_and_mixes_across_the_cache():
    idx = np.arange(100_000)
    a = rank_token_order(idx, rank=0, world_size=1, epoch=0, seed=1, block_tokens=256,
                         window_tokens=8192)
    b = rank_token_order(idx, rank=0, world_size=1, epoch=0, seed=1, block_tokens=256,
                         window_tokens=8192)
    c = rank_token_order(idx, rank=0, world_size=1, epoch=1, seed=1, block_tokens=256,
                         window_tokens=8192)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(np.sort(a), idx)
    # A batch of 4096 draws from many places in the cache, not one contiguous run.
    first = np.sort(a[:4096])
    assert first[-1] - first[0] > 20_000 and (np.diff(first) == 1).mean() < 0.5


def test_state_dict_resumes_mid_epoch(small_cache):
    cache = ActivationCache(small_cache)
    idx = cache.select(splits=["evaluation"], languages=["hi", "es"])
    assert 0 < len(idx) < cache.n_tokens
    full = CachedActivationBatches(cache, ["layers.2.mlp"], idx, 50, seed=7)
    expected = [b["index"] for b in full]
    first = CachedActivationBatches(cache, ["layers.2.mlp"], idx, 50, seed=7)
    it = iter(first)
    head = [next(it)["index"] for _ in range(3)]
    state = first.state_dict()
    resumed = CachedActivationBatches(cache, ["layers.2.mlp"], idx, 50, seed=7)
    resumed.load_state_dict(state)
    tail = [b["index"] for b in resumed]
    got = head + tail
    assert len(got) == len(expected)
    assert all(torch.equal(x, y) for x, y in zip(got, expected))
    # Lightning never asks past the last batch; the next iteration still starts a new epoch.
    assert resumed.state_dict() == {"epoch": 0, "batches_done": len(expected)}
    next_epoch = [b["index"] for b in resumed]
    assert resumed.epoch == 1 and len(next_epoch) == len(expected)
    assert not all(torch.equal(x, y) for x, y in zip(next_epoch, expected))


def test_lightning_style_iteration_sees_every_epoch_and_full_validation(small_cache):
    """Stop after len() batches, as Lightning does, and iterate again: no empty epochs."""
    cache = ActivationCache(small_cache)
    idx = cache.select(splits=["tuning"])
    train = CachedActivationBatches(cache, ["layers.2.mlp"], idx, 64, seed=1)
    val = CachedActivationBatches(cache, ["layers.2.mlp"], idx, 64, shuffle=False,
                                  resumable=False)
    for epoch in range(3):
        it = iter(train)
        got = [next(it) for _ in range(len(train))]
        assert len(got) == len(train) > 0 and train.epoch == epoch
        part = [b for _, b in zip(range(2), val)]  # a limited validation pass
        assert len(part) == 2
        assert sum(len(b["index"]) for b in val) == len(idx)  # the next one is whole again


def test_reader_errors_name_the_problem(small_cache, tmp_path):
    from sae_train.cache.manifest import CacheError

    cache = ActivationCache(small_cache)
    with pytest.raises(CacheError, match="site 'layers.9.resid' is not in the cache.*layers.1.resid"):
        cache.gather("layers.9.resid", np.arange(3))
    with pytest.raises(CacheError, match="languages \\['fr'\\] are not in the cache"):
        cache.select(languages=["fr"])
    with pytest.raises(CacheError, match="no activation cache at"):
        ActivationCache(tmp_path / "nothing")
