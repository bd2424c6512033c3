"""PyTorch adapter: an `IterableDataset` of ready-made batches.

Use it with `DataLoader(dataset, batch_size=None)`. With DataLoader workers, each worker streams
a disjoint share of the epoch's chunks (never the same chunk twice); workers must be started
with `spawn` or `forkserver` (zarr v3's event loop and TensorFlow do not survive `fork`), which
`loader()` does.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cubebench.loading import Stream


class CubeBatches(IterableDataset):
    """Batches `(X[B, F], y[B])` (pixels) or `(x, y, mask)` (windows) as float32 tensors,
    one epoch per iteration."""

    def __init__(self, stream: Stream):
        super().__init__()
        self.stream = stream
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Like DistributedSampler.set_epoch: a new shuffle order for the next iteration."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = get_worker_info()
        stream = self.stream
        if info is not None:
            stream.shard(info.id, info.num_workers)
        for batch in stream.batches(self.epoch):
            yield tuple(torch.from_numpy(a) for a in batch)


def loader(
    stream: Stream, num_workers: int = 0, epoch: int = 0, **kwargs
) -> DataLoader | CubeBatches:
    """The stream's batches for torch: the dataset itself without workers, else a DataLoader
    (no re-batching, spawned workers).

    Without workers a DataLoader only adds bookkeeping (~60 us a batch, 15-20 % of the
    loader's time at batch 4096); pass DataLoader options (e.g. `pin_memory`) to get one.
    """
    dataset = CubeBatches(stream)
    dataset.set_epoch(epoch)
    if not num_workers and not kwargs:
        return dataset
    options = {"batch_size": None, "num_workers": num_workers, **kwargs}
    if num_workers:
        options.setdefault("multiprocessing_context", "spawn")
        options.setdefault("persistent_workers", False)
    return DataLoader(dataset, **options)
