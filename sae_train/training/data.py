"""The cache's ActivationDataModule, with the epoch bookkeeping that Lightning's loops need.

``CachedActivationBatches`` advances its epoch only when its generator is resumed after the last
batch. Lightning knows the loader's length and never asks for that extra item, so (1) every
second training epoch is empty (``batches_done`` is still at the end) and (2) every validation
after the first sees no data. This wrapper settles the state at the start of each iteration
instead. Remove it once ``CachedActivationBatches.__iter__`` does the same itself (reported
upstream with the fix).
"""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset

from sae_train.cache.datamodule import ActivationDataModule, CachedActivationBatches


class _SettledEpochs(IterableDataset):
    """Iterates ``inner`` from a settled state: a finished epoch rolls over to the next one; a
    non-resumable (validation) set always starts at its first batch."""

    def __init__(self, inner: CachedActivationBatches, resumable: bool):
        self.inner, self.resumable = inner, resumable

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[dict]:
        inner = self.inner
        if not self.resumable:
            inner.batches_done = 0
        elif inner.batches_done >= len(inner):
            inner.epoch += 1
            inner.batches_done = 0
        return iter(inner)


class SAEDataModule(ActivationDataModule):
    """:class:`ActivationDataModule` whose loaders behave under Lightning's epoch loop."""

    def train_dataloader(self) -> DataLoader:
        return self._loader(_SettledEpochs(self.train_data, resumable=True))

    def val_dataloader(self):
        if self.val_data is None:
            return []
        return self._loader(_SettledEpochs(self.val_data, resumable=False))
