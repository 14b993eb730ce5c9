"""Stream shuffled batches of cached activations into Lightning, DDP-aware, with prefetch."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from sae_train.cache.reader import ActivationCache


def rank_token_order(indices: np.ndarray, *, rank: int, world_size: int, epoch: int, seed: int,
                     shuffle: bool = True, block_tokens: int = 1024,
                     window_tokens: int = 262144) -> np.ndarray:
    """The tokens rank ``rank`` reads in ``epoch``, in reading order.

    Shuffling is two-level so that reads stay fast: contiguous blocks are permuted globally
    (cheap, sequential I/O), then tokens are permuted within windows of consecutive blocks.
    The permuted order is cut into ``world_size`` near-equal contiguous parts: ranks are
    disjoint and together read every token once.
    """
    order = np.asarray(indices, dtype=np.int64)
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        n_blocks = -(-len(order) // block_tokens)
        blocks = rng.permutation(n_blocks)
        order = np.concatenate([order[b * block_tokens:(b + 1) * block_tokens] for b in blocks]) \
            if n_blocks else order
        for start in range(0, len(order), window_tokens):
            window = order[start:start + window_tokens]
            order[start:start + window_tokens] = window[rng.permutation(len(window))]
    bounds = np.linspace(0, len(order), world_size + 1).astype(np.int64)
    return order[bounds[rank]:bounds[rank + 1]]


def batch_count(n_tokens: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Batches per rank, identical on every rank (DDP needs the same number of steps)."""
    per_rank_max = -(-n_tokens // world_size)
    per_rank_min = n_tokens // world_size
    if drop_last:
        return per_rank_min // batch_size
    return -(-per_rank_max // batch_size)


class CachedActivationBatches(IterableDataset):
    """Yields dicts ``{site: (batch, width) tensor, "index": (batch,) global token ids}``.

    Each iteration is one epoch. ``(epoch, batches_done)`` is the ``state_dict``: a resumed
    run continues mid-epoch with the same order, and an iteration that starts after a finished
    epoch begins the next one. With ``resumable=False`` every iteration is the whole epoch 0
    order (validation).
    """

    def __init__(self, cache: ActivationCache, sites: list[str], indices: np.ndarray,
                 batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, block_tokens: int = 1024,
                 window_tokens: int = 262144, prefetch: int = 4, resumable: bool = True):
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if len(indices) == 0:
            raise ValueError(f"no cached tokens selected from {cache.path}")
        for site in sites:
            cache.width(site)  # fails early, naming the cached sites
        self.cache, self.sites, self.indices = cache, list(sites), np.asarray(indices)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.block_tokens, self.window_tokens, self.prefetch = block_tokens, window_tokens, prefetch
        self.resumable = resumable
        self.epoch = 0
        self.batches_done = 0  # within the current epoch, for exact resume

    def __len__(self) -> int:
        return batch_count(len(self.indices), self.world_size, self.batch_size, self.drop_last)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Index arrays of this rank's batches in ``epoch`` (each sorted for fast reads)."""
        order = rank_token_order(self.indices, rank=self.rank, world_size=self.world_size,
                                 epoch=epoch, seed=self.seed, shuffle=self.shuffle,
                                 block_tokens=self.block_tokens, window_tokens=self.window_tokens)
        n = len(self)
        if n == 0:
            return []
        if self.drop_last:
            order = order[:n * self.batch_size]
        return [np.sort(part) for part in np.array_split(order, n)]

    def _load(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        batch = {site: self.cache.gather(site, idx) for site in self.sites}
        batch["index"] = torch.from_numpy(idx)
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Roll over at the *start* of an iteration: Lightning knows len() and never asks the
        # generator for the item after the last batch, so code after the loop would not run.
        if not self.resumable:
            self.batches_done = 0  # e.g. validation: always the whole set
        elif self.batches_done >= len(self):
            self.epoch += 1
            self.batches_done = 0
        batches = self.epoch_batches(self.epoch)[self.batches_done:]
        if self.prefetch <= 0:
            for idx in batches:
                self.batches_done += 1
                yield self._load(idx)
        else:
            yield from self._prefetched(batches)

    def _prefetched(self, batches: list[np.ndarray]):
        """Read ahead on a background thread (numpy copies release the GIL)."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def worker():
            try:
                for idx in batches:
                    if stop.is_set():
                        return
                    q.put(self._load(idx))
                q.put(None)
            except BaseException as err:  # surface reader errors in the training loop
                q.put(err)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.batches_done += 1
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a worker waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])


class ActivationDataModule(L.LightningDataModule):
    """Batches of one or more cached sites (aligned by token) for SAE training.

    Tokens of the ``val_splits`` are held out for validation; each DDP rank reads a disjoint
    part of the training tokens. Pinned memory is used when a GPU is present.
    """

    def __init__(self, cache_dir: str, sites: list[str] | str, batch_size: int = 4096, *,
                 train_splits: list[str] | None = None, val_splits: list[str] | None = None,
                 languages: list[str] | None = None, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, block_tokens: int = 1024, window_tokens: int = 262144,
                 prefetch: int = 4, pin_memory: bool | None = None, verify: bool = True):
        super().__init__()
        self.verify = verify  # each shard's sha256, checked the first time it is read
        self.cache_dir = cache_dir
        self.sites = [sites] if isinstance(sites, str) else list(sites)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.train_splits, self.val_splits, self.languages = train_splits, val_splits, languages
        self.block_tokens, self.window_tokens, self.prefetch = block_tokens, window_tokens, prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.cache: ActivationCache | None = None
        self.train_data: CachedActivationBatches | None = None
        self.val_data: CachedActivationBatches | None = None
        self._pending_state: dict | None = None

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        if self.cache is None:
            self.cache = ActivationCache(self.cache_dir, verify_reads=self.verify)
        rank, world = self._rank_world()
        train_idx = self.cache.select(self.train_splits, self.languages)
        if self.val_splits:
            val_idx = self.cache.select(self.val_splits, self.languages)
            train_idx = np.setdiff1d(train_idx, val_idx, assume_unique=True)
            self.val_data = CachedActivationBatches(
                self.cache, self.sites, val_idx, self.batch_size, seed=self.seed, shuffle=False,
                drop_last=False, rank=rank, world_size=world, prefetch=self.prefetch,
                resumable=False)
        if self.train_data is None:
            self.train_data = CachedActivationBatches(
                self.cache, self.sites, train_idx, self.batch_size, seed=self.seed,
                shuffle=self.shuffle, drop_last=self.drop_last, rank=rank, world_size=world,
                block_tokens=self.block_tokens, window_tokens=self.window_tokens,
                prefetch=self.prefetch)
            if self._pending_state is not None:  # restored from a checkpoint before setup
                self.train_data.load_state_dict(self._pending_state)
                self._pending_state = None

    def _loader(self, data) -> DataLoader:
        # Batches are built by the dataset; the loader only pins and hands them over.
        return DataLoader(data, batch_size=None, num_workers=0, pin_memory=self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data)

    def val_dataloader(self):
        return self._loader(self.val_data) if self.val_data is not None else []

    def state_dict(self) -> dict:
        return {"train": self.train_data.state_dict()} if self.train_data else {}

    def load_state_dict(self, state: dict) -> None:
        if state.get("train"):
            if self.train_data is not None:
                self.train_data.load_state_dict(state["train"])
            else:
                self._pending_state = state["train"]
