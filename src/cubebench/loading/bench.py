"""`cubebench bench-loader`: the loader against the decode limit, measured in one run.

The limit is decode-and-mask of every chunk of the part with the same number of threads. Each
installed reader does it once (`raw_by_reader`); the fastest is the reference (`raw_reader`).
Shared machines drift by tens of percent within a minute, so the reference is then measured
again before every loader epoch, and the ratio compares the two sums over the same stretch of
time.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cubebench.loading import PatchStream, Stream, open_stream
from cubebench.loading.readers import ChunkReader, available_readers, open_reader
from cubebench.task import PreparedTask


class RawDecode:
    """The bare minimum a loader must do: read every chunk, mask invalid and unselected
    pixels and those of other parts, extract the pairs."""

    def __init__(self, stream: Stream, reader: ChunkReader):
        self.stream = stream
        self.reader = reader
        # open handles outside any timer
        reader.read(stream.variables[0], stream.chunk_slices(stream.chunks[0]))

    def _one(self, chunk) -> int:
        window = self.stream.chunk_slices(chunk)
        arrays = self.reader.read_many(self.stream.variables, window)
        valid = np.isfinite(arrays[0])
        for a in arrays[1:]:
            valid &= np.isfinite(a)
        sel = self.stream.task.selections[self.stream.part]  # the part's region and time
        st, sy, sx = (mask[w] for mask, w in zip((sel.time, sel.lat, sel.lon), window))
        if not (st.all() and sy.all() and sx.all()):
            valid &= st[:, None, None] & sy[None, :, None] & sx[None, None, :]
        part_mask = self.stream.task.part_mask(self.stream.part, window)
        if part_mask is not None:
            valid &= part_mask
        pairs = [a[valid] for a in arrays]  # the masked pairs, as a loader must extract them
        return len(pairs[-1])

    def run(self) -> tuple[int, float]:
        """(pairs, seconds) of one pass with the stream's number of threads."""
        start = time.perf_counter()
        with ThreadPoolExecutor(self.stream.threads) as pool:
            pairs = sum(pool.map(self._one, self.stream.chunks))
        return pairs, time.perf_counter() - start


Epoch = Callable[[int], tuple[int, float | None, float | None]]  # -> pairs, stall, first batch


def _numpy_epochs(stream: Stream, iterate) -> Epoch:
    def epoch(index: int) -> tuple[int, float, float | None]:
        pairs, stall, first = 0, 0.0, None
        start = time.perf_counter()
        batches = iterate(index)
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            stall += time.perf_counter() - asked
            if batch is None:
                return pairs, stall, first
            if first is None:
                first = time.perf_counter() - start
            pairs += len(batch[1])  # pixels: pairs; patches: windows

    return epoch


def epoch_runner(adapter: str, stream: Stream, workers: int = 0) -> Epoch:
    """epoch index -> one consumed epoch; the framework is imported here, outside timers."""
    if adapter == "numpy":
        return _numpy_epochs(stream, stream.batches)
    if adapter == "torch":
        from cubebench.loading.torch import loader

        return _numpy_epochs(
            stream, lambda index: iter(loader(stream, num_workers=workers, epoch=index))
        )
    if adapter == "tf":
        return _tf_epochs(stream)
    raise ValueError(f"unknown adapter {adapter!r}")


def _tf_epochs(stream: Stream) -> Epoch:
    """Consume the tf.data pipeline inside a traced graph, as Keras' fit does: iterating it
    from Python would add ~1 ms of eager overhead per batch that training never pays. Stall
    is not observable from inside the graph (None); the first batch is timed by the adapter."""
    import tensorflow as tf

    from cubebench.loading.tf import dataset

    @tf.function
    def count(batches):
        return batches.reduce(
            tf.constant(0, tf.int64), lambda n, b: n + tf.cast(tf.shape(b[1])[0], tf.int64)
        )

    batches = dataset(stream)  # each pass is the next epoch, as in fit(epochs=N)

    def epoch(index: int) -> tuple[int, None, float | None]:
        return int(count(batches)), None, stream.stats.time_to_first_batch_s

    return epoch


def bench_loader(
    task: PreparedTask,
    part: str = "train",
    batch_size: int = 4096,
    adapter: str = "numpy",
    epochs: int = 1,
    threads: int = 2,
    buffer_chunks: int = 8,
    workers: int = 0,
    reader: str | None = None,
    storage_options: dict | None = None,
) -> dict:
    """One JSON-able row: loader throughput, the raw limit in the same run, and the costs.

    On a patch task the items are windows: the raw limit is the windows of the part over the
    time to decode and mask every chunk they need, so `ratio_to_raw` is what assembling,
    shuffling and batching the windows cost on top of decoding.
    """
    started = time.perf_counter()
    stream = open_stream(
        task,
        part,
        batch_size=batch_size,
        threads=threads,
        buffer_chunks=buffer_chunks,
        reader=reader,
        storage_options=storage_options,
    )
    setup_s = time.perf_counter() - started  # includes loading the compiled kernels
    names = [r for r in available_readers(task.cube) if r != "xarray"] or ["xarray"]
    raws = {n: RawDecode(stream, open_reader(task.cube, n, storage_options)) for n in names}
    by_reader = {}
    patches = isinstance(stream, PatchStream)
    items = "windows" if patches else "pairs"
    per_epoch = task.samples[part]  # windows of a patch task; valid pixels of a pixel task
    for name, raw in raws.items():
        pairs, seconds = raw.run()
        by_reader[name] = (per_epoch if patches else pairs) / seconds
    best = max(by_reader, key=by_reader.get)
    run_epoch = epoch_runner(adapter, stream, workers)
    raw_pairs = raw_seconds = pairs = seconds = stall = 0.0
    first = None
    for index in range(epochs):
        n, s = raws[best].run()
        raw_pairs, raw_seconds = raw_pairs + (per_epoch if patches else n), raw_seconds + s
        start = time.perf_counter()
        n, epoch_stall, epoch_first = run_epoch(index)
        seconds += time.perf_counter() - start
        pairs += n
        stall = None if epoch_stall is None or stall is None else stall + epoch_stall
        first = epoch_first if first is None else first
    stats = stream.stats
    workers_used = workers > 0
    raw_rate = raw_pairs / raw_seconds
    row = {
        "cube": task.cube.attrs.get("cubebench_source", "?"),
        "chunk_shape": list(task.chunk_shape),
        "geometry": task.spec.geometry,
        **({"patch": list(stream.window)} if patches else {}),
        "part": part,
        "adapter": adapter,
        "reader": stream.reader.name,
        "batch_size": batch_size,
        "threads": threads,
        "buffer_chunks": buffer_chunks,
        "workers": workers,
        "epochs": epochs,
        items: int(pairs),
        f"expected_{items}": per_epoch * epochs,
        "seconds": round(seconds, 4),
        f"{items}_per_s": pairs / seconds,
        f"raw_decode_{items}_per_s": raw_rate,
        "raw_reader": best,
        "raw_by_reader": {name: round(rate) for name, rate in by_reader.items()},
        "ratio_to_raw": (pairs / seconds) / raw_rate,
        # with DataLoader workers the chunk-side counters live in the worker processes
        "read_amplification": None if workers_used else stats.read_amplification,
        "chunks_decoded": None if workers_used else stats.chunks_decoded,
        "bytes_read": None if workers_used else stats.bytes_read,
        "bytes_decoded": None if workers_used else stats.bytes_decoded,
        # the process's lifetime peak (KiB on Linux): preparation, raw decode and the epochs
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "setup_s": round(setup_s, 3),
        "time_to_first_batch_s": first,
        "stall_fraction": None if stall is None else stall / seconds,
    }
    if patches and not workers_used:  # decoded bytes per byte of the windows delivered
        t, h, w = stream.window
        window_bytes = pairs * t * h * w * stream.itemsize * len(stream.variables)
        row["decoded_over_window_bytes"] = stats.bytes_decoded / window_bytes
    return row
