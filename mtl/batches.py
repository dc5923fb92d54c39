"""How the training loop fetches batches: in one gather where the data set can, without a DataLoader's
per-batch bookkeeping where nothing needs it.

A DataLoader fetches a batch with ``dataset.__getitems__(indices)`` where the data set has
it, then collates the list of samples it returns. A data set that holds its samples in
tensors can gather a whole batch with one indexing operation; unbinding that batch into
samples only for the collate function to stack them again costs more than the gather
itself at small batch sizes. Such a data set returns a ``Gathered`` batch instead: it is
a sequence of samples (so any consumer of ``__getitems__`` still works), and ``collate``
hands its tensors on as they are.

``InProcessLoader`` yields what a ``DataLoader`` with ``num_workers=0`` and the same sampler
yields, batch for batch, for one process. At small batches a DataLoader's iterator
(profiler annotations, prefetch, state tracking in Accelerate's wrapper) costs more per
batch than fetching the batch itself; the Trainer uses this loader when it trains in one
process without worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from accelerate.utils import send_to_device
from torch.utils.data import BatchSampler, Dataset, Sampler, default_collate


class Gathered(Sequence):
    """A batch as its fields' tensors (``images, labels, ...``, dim 0 the samples), also a sequence of samples."""

    def __init__(self, *fields: torch.Tensor):
        if not fields or len({f.shape[0] for f in fields}) != 1:
            raise ValueError(f"a gathered batch needs fields of one length, got {[len(f) for f in fields]}")
        self.fields = fields

    def __len__(self) -> int:
        return len(self.fields[0])

    def __getitem__(self, index: int) -> tuple:
        return tuple(field[index] for field in self.fields)


def collate(samples):
    """A DataLoader ``collate_fn``: a ``Gathered`` batch's tensors as a list (what ``default_collate`` makes
    of tuple samples), anything else through ``default_collate``."""
    if isinstance(samples, Gathered):
        return list(samples.fields)
    return default_collate(samples)


class InProcessLoader:
    """Batches of ``dataset`` in the order of ``BatchSampler(sampler, batch_size, drop_last)``, collated with
    ``collate`` and moved to ``device``: a DataLoader's batches with ``num_workers=0``, fetched in this process."""

    def __init__(self, dataset: Dataset, sampler: Sampler, batch_size: int, drop_last: bool = False,
                 device: torch.device | str = "cpu"):
        self.dataset, self.sampler = dataset, sampler
        self.batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the sampler and the data set, as Accelerate's loaders do."""
        for part in (self.sampler, self.dataset):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        return self.batches()

    def batches(self, skip: int = 0) -> Iterator:
        """The epoch's batches after the first ``skip`` (skipped ones are not fetched)."""
        fetch = getattr(self.dataset, "__getitems__", None)
        for k, indices in enumerate(self.batch_sampler):
            if k < skip:
                continue
            samples = fetch(indices) if fetch is not None else [self.dataset[i] for i in indices]
            batch = collate(samples)
            yield batch if self.device.type == "cpu" else send_to_device(batch, self.device)


__all__ = ["Gathered", "collate", "InProcessLoader"]
