"""PyTorch adapter: an `IterableDataset` of ready-made batches, and `to_device`, which hands a
training loop its batches as tensors on its device.

Use the dataset with `DataLoader(dataset, batch_size=None)`. With DataLoader workers, each
worker streams a disjoint share of the epoch's chunks (never the same chunk twice); workers
must be started with `spawn` or `forkserver` (zarr v3's event loop and TensorFlow do not
survive `fork`), which `loader()` does.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cubebench.gpu import CopyClock
from cubebench.loading import Stream

PREFETCH = 2  # batches copied to the device ahead of the one the loop steps on

HostBatch = Sequence[np.ndarray]
DeviceBatch = tuple[torch.Tensor, ...]


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


# --- device prefetch ----------------------------------------------------------------------


def to_device(
    batches: Iterable[HostBatch],
    device: str | torch.device,
    prefetch: int = PREFETCH,
    clock: CopyClock | None = None,
) -> Iterator[DeviceBatch]:
    """The numpy batches as tensors on `device`, in order, each exactly once.

    On CUDA the copies of the next `prefetch` batches run on a side stream while the loop
    computes (`CudaCopier`), so the loop's step never waits on a host-to-device copy it
    could have overlapped; what it still waits for is the next batch from the stream and its
    staging into pinned memory. On the CPU it is the identity: `torch.from_numpy` (no copy,
    no read-ahead, no threads). Other devices get a plain synchronous `.to(device)`.
    Closing the iterator closes `batches`. `clock` (CUDA only) gets the device time and the
    bytes of every copy (`cubebench.gpu.CopyClock`): the loops pass the context's for their
    training batches.
    """
    prefetch = check_prefetch(prefetch)
    device = torch.device(device)
    if device.type == "cuda":
        return prefetched(batches, CudaCopier(device, prefetch, clock), prefetch)
    return _mapped(batches, device)


def check_prefetch(prefetch: int) -> int:
    """`prefetch` as an int >= 1 (the batch in hand counts: 0 would mean no batch at all)."""
    try:
        value = operator.index(prefetch)
    except TypeError:
        value = 0
    if isinstance(prefetch, bool) or value < 1:
        raise ValueError(f"prefetch must be an integer >= 1, got {prefetch!r}")
    return value


def _mapped(batches: Iterable[HostBatch], device: torch.device) -> Iterator[DeviceBatch]:
    source = iter(batches)
    try:
        for batch in source:
            tensors = tuple(torch.from_numpy(np.asarray(a)) for a in batch)
            yield tensors if device.type == "cpu" else tuple(t.to(device) for t in tensors)
    finally:
        _close(source)


class Copier(Protocol):
    """How `prefetched` moves a batch: `start` issues its copy (asynchronous) and returns a
    handle, `finish` makes the copy's result safe for the consumer to use."""

    def start(self, batch: Any) -> Any: ...

    def finish(self, handle: Any) -> Any: ...


def prefetched(batches: Iterable[Any], copier: Copier, prefetch: int) -> Iterator[Any]:
    """`copier.finish(copier.start(b))` for every `b` of `batches`, in order, with up to
    `prefetch` copies started and not yet finished.

    Kept apart from the copy mechanism so that the order, the exactly-once property and the
    bound on copies in flight can be tested without a GPU. Batch k is finished before batch
    k + prefetch is started, both inside the consumer's `next()`: that call is the loop's
    wait for data. Closing the iterator closes `batches`; started copies are dropped.
    """
    return _prefetched(iter(batches), copier, check_prefetch(prefetch))


def _prefetched(source: Iterator[Any], copier: Copier, prefetch: int) -> Iterator[Any]:
    pending: deque = deque()
    end = object()
    try:
        for batch in source:
            pending.append(copier.start(batch))
            if len(pending) >= prefetch:
                break
        while pending:
            ready = copier.finish(pending.popleft())
            batch = next(source, end)
            if batch is not end:
                pending.append(copier.start(batch))
            yield ready
    finally:
        pending.clear()
        _close(source)


def _close(iterator: Iterator) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


class Staging:
    """A ring of `slots` host staging buffers, one byte buffer per array of a batch, grown
    when a batch needs more (the last, partial batch fits in the full ones' buffers).

    A slot is written again only after the copy out of it has completed: `staged` takes the
    copy's event (anything with `synchronize()`), and the next `stage` into that slot waits
    on it. With `prefetch + 1` slots that event belongs to the batch before the one the loop
    just received, so the wait is normally over before it starts.
    """

    def __init__(self, slots: int, pin: bool):
        self.pin = pin
        self.buffers: list[list[torch.Tensor]] = [[] for _ in range(max(1, slots))]
        self.copies: list[Any] = [None] * len(self.buffers)
        self.next = 0

    def stage(self, batch: HostBatch) -> tuple[int, DeviceBatch]:
        """Copy the batch into the next slot's buffers; returns the slot and the tensors
        (views of the buffers, each of its array's dtype and shape)."""
        slot = self.next
        self.next = (slot + 1) % len(self.buffers)
        if self.copies[slot] is not None:
            self.copies[slot].synchronize()
            self.copies[slot] = None
        buffers = self.buffers[slot]
        staged = []
        for i, array in enumerate(batch):
            array = np.asarray(array)
            size = array.nbytes
            if i == len(buffers):
                buffers.append(torch.empty(0, dtype=torch.uint8))
            if buffers[i].numel() < size:
                buffers[i] = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
            view = buffers[i][:size].view(dtype).view(array.shape)
            np.copyto(view.numpy(), array, casting="no")
            staged.append(view)
        return slot, tuple(staged)

    def staged(self, slot: int, copy: Any) -> None:
        """The copy out of `slot` has been issued; `copy.synchronize()` waits for its end."""
        self.copies[slot] = copy


class CudaCopier:
    """Host-to-device copies of numpy batches on a side CUDA stream, from pinned buffers.

    `start` stages the batch into pinned memory (`Staging`, `prefetch + 1` slots), issues
    `non_blocking` copies on the side stream and records an event after them; `finish` makes
    the consumer's current stream wait on that event (the host does not wait) and marks the
    device tensors with `record_stream`, so that the caching allocator, which allocated them
    on the side stream, does not hand their memory out again before the consumer's work on
    them has run.

    With a `clock`, a timing event is recorded before the copies too, and the pair goes to
    the clock with the batch's bytes: the copy stream's time between them is the copies'
    (read after the fit; the host never waits on them here).
    """

    def __init__(
        self, device: torch.device, prefetch: int = PREFETCH, clock: CopyClock | None = None
    ):
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.staging = Staging(check_prefetch(prefetch) + 1, pin=True)
        self.clock = clock

    def start(self, batch: HostBatch) -> tuple[DeviceBatch, torch.cuda.Event]:
        slot, host = self.staging.stage(batch)
        timed = self.clock is not None
        with torch.cuda.stream(self.stream):
            began = torch.cuda.Event(enable_timing=True) if timed else None
            if began is not None:
                began.record(self.stream)
            tensors = tuple(t.to(self.device, non_blocking=True) for t in host)
            copied = torch.cuda.Event(enable_timing=timed)
            copied.record(self.stream)
        self.staging.staged(slot, copied)
        if began is not None:
            self.clock.record(began, copied, sum(t.nbytes for t in host))
        return tensors, copied

    def finish(self, handle: tuple[DeviceBatch, torch.cuda.Event]) -> DeviceBatch:
        tensors, copied = handle
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(copied)
        for tensor in tensors:
            tensor.record_stream(consumer)
        return tensors
