"""`cubebench bench-loader`: the loader against the decode limit, measured in one run.

The limit is decode-and-mask of every chunk of the part with the same number of threads, by
each installed reader; the fastest one is the reference (`raw_reader`).
"""

from __future__ import annotations

import resource
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cubebench.loading.readers import available_readers, open_reader
from cubebench.loading.stream import ChunkStream
from cubebench.task import PreparedTask


def raw_decode(
    task: PreparedTask,
    part: str,
    reader_name: str,
    threads: int,
    storage_options: dict | None = None,
) -> dict:
    """Pairs per second of the bare minimum: read every chunk, mask NaNs, extract the pairs."""
    reader = open_reader(task.cube, reader_name, storage_options)
    stream = ChunkStream(task, part, threads=threads, reader=reader)
    names = stream.variables

    def one(chunk) -> int:
        window = stream.window(chunk)
        arrays = [reader.read(v, window) for v in names]
        valid = np.isfinite(arrays[0])
        for a in arrays[1:]:
            valid &= np.isfinite(a)
        pairs = [a[valid] for a in arrays]  # the masked pairs, as a loader must extract them
        return len(pairs[-1])

    reader.read(names[0], stream.window(stream.chunks[0]))  # open handles outside the timer
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        pairs = sum(pool.map(one, stream.chunks))
    seconds = time.perf_counter() - start
    return {"reader": reader_name, "pairs": pairs, "pairs_per_s": pairs / seconds}


def _adapter(adapter: str, workers: int):
    """epoch -> batch iterator; the framework is imported here, outside the timed loop."""
    if adapter == "numpy":
        return lambda stream, epoch: stream.batches(epoch)
    if adapter == "torch":
        from cubebench.loading.torch import loader

        return lambda stream, epoch: iter(loader(stream, num_workers=workers, epoch=epoch))
    raise ValueError(f"unknown adapter {adapter!r}")


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
    """One JSON-able row: loader throughput, the raw limit in the same run, and the costs."""
    readers = [r for r in available_readers(task.cube) if r != "xarray"] or ["xarray"]
    raw = [raw_decode(task, part, name, threads, storage_options) for name in readers]
    stream = ChunkStream(
        task,
        part,
        batch_size,
        threads=threads,
        buffer_chunks=buffer_chunks,
        reader=reader,
        storage_options=storage_options,
    )
    context = {"task": task, "part": part, "stream": stream, "raw": raw, "adapter": adapter}
    if adapter == "tf":
        pairs, seconds = _consume_tf(stream, epochs)
        first = stream.stats.time_to_first_batch_s  # the stream runs in this process
        return _report(
            **context,
            epochs=epochs,
            workers=0,
            pairs=pairs,
            seconds=seconds,
            stall=None,
            first=first,
        )
    iterate = _adapter(adapter, workers)
    pairs = 0
    stall = 0.0
    first = None
    start = time.perf_counter()
    for epoch in range(epochs):
        batches = iterate(stream, epoch)
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            stall += time.perf_counter() - asked
            if batch is None:
                break
            if first is None:
                first = time.perf_counter() - start
            pairs += len(batch[1])
    seconds = time.perf_counter() - start
    return _report(
        **context,
        epochs=epochs,
        workers=workers,
        pairs=pairs,
        seconds=seconds,
        stall=stall,
        first=first,
    )


def _consume_tf(stream: ChunkStream, epochs: int) -> tuple[int, float]:
    """Consume the tf.data pipeline inside a traced graph, as Keras' fit does: iterating it
    from Python would add ~1 ms of eager overhead per batch that training never pays.
    Stall is not observable from inside the graph and is reported as None."""
    import tensorflow as tf

    from cubebench.loading.tf import dataset

    @tf.function
    def count(batches):
        return batches.reduce(
            tf.constant(0, tf.int64), lambda n, b: n + tf.cast(tf.shape(b[1])[0], tf.int64)
        )

    batches = dataset(stream)  # each pass is the next epoch
    pairs = 0
    start = time.perf_counter()
    for _ in range(epochs):
        pairs += int(count(batches))
    return pairs, time.perf_counter() - start


def _report(
    *,
    task: PreparedTask,
    part: str,
    stream: ChunkStream,
    raw: list[dict],
    adapter: str,
    epochs: int,
    workers: int,
    pairs: int,
    seconds: float,
    stall: float | None,
    first: float | None,
) -> dict:
    stats = stream.stats
    best = max(raw, key=lambda r: r["pairs_per_s"])
    workers_used = workers > 0
    return {
        "cube": task.cube.attrs.get("cubebench_source", "?"),
        "chunk_shape": list(task.chunk_shape),
        "part": part,
        "adapter": adapter,
        "reader": stream.reader.name,
        "batch_size": stream.batch_size,
        "threads": stream.threads,
        "buffer_chunks": stream.buffer_chunks,
        "epochs": epochs,
        "pairs": pairs,
        "expected_pairs": task.samples[part] * epochs,
        "seconds": round(seconds, 4),
        "pairs_per_s": pairs / seconds,
        "raw_decode_pairs_per_s": best["pairs_per_s"],
        "raw_reader": best["reader"],
        "raw_by_reader": {r["reader"]: round(r["pairs_per_s"]) for r in raw},
        "ratio_to_raw": (pairs / seconds) / best["pairs_per_s"],
        # with DataLoader workers the chunk-side counters live in the worker processes
        "read_amplification": None if workers_used else stats.read_amplification,
        "chunks_decoded": None if workers_used else stats.chunks_decoded,
        "bytes_read": None if workers_used else stats.bytes_read,
        "bytes_decoded": None if workers_used else stats.bytes_decoded,
        # the process's lifetime peak (KiB on Linux): preparation, raw decode and the epochs
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "time_to_first_batch_s": first,
        "stall_fraction": None if stall is None else stall / seconds,
    }
