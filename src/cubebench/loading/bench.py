"""`cubebench bench-loader`: the loader against the irreducible work, measured in one run.

The reference (`Reference`) is what any loader must do and nothing more: read each chunk's
stored bytes, decode them, and mask (finite in every variable, inside the part's selection
and blocks), counting the pairs without extracting them. It runs with the loader's number of
threads, and every installed reader does it once (`raw_by_reader`, each limited to those
threads); the fastest is the reference (`raw_reader`). Today's older figure, which also
extracts the masked pairs with numpy's boolean indexing, is `raw_extract_*`.

Shared machines drift by tens of percent within a minute, and the first pass pays for the
page cache, thread start-up and compiled kernels. So one warm-up pair is run and dropped, and
then reference and loader alternate (RLRL...): each pair's ratio compares the two over the
same stretch of time, and pairs are added until the 95 % interval of their geometric mean is
within ±10 % (`ratio_to_raw_ci95`), at least `epochs` of them, or until `max_seconds`
(then `ratio_converged` is false).

`emulate(...)` holds each batch for batch / R seconds in the consumer (a sleep, which
releases the GIL, as a device step would) and reports the accelerator utilisation (busy /
wall); `sweep(...)` finds the highest rate kept at >= 90 % utilisation, as MLPerf Storage
does without accelerators.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cubebench.loading import PatchStream, Stream, open_stream
from cubebench.loading.kernels import valid_mask
from cubebench.loading.readers import ChunkReader, available_readers, open_reader
from cubebench.task import PreparedTask

TARGET_HALF_WIDTH = 0.10  # stop adding pairs when the ratio's 95 % interval is within ±10 %
MAX_SECONDS = 30.0  # ... or when the pairs have taken this long
TARGET_UTILISATION = 0.90  # MLPerf Storage's pass mark for accelerator utilisation


class Reference:
    """The irreducible work of one epoch of the stream's part: per chunk, read and decode
    every variable and mask the pairs (finite, in the part's selection and blocks); count
    them (`extract=False`), or also extract them as a bare numpy loader would."""

    def __init__(self, stream: Stream, reader: ChunkReader, extract: bool = False):
        self.stream = stream
        self.reader = reader
        self.extract = extract
        # open handles outside any timer
        reader.read(stream.variables[0], stream.chunk_slices(stream.chunks[0]))

    def _one(self, chunk) -> int:
        window = self.stream.chunk_slices(chunk)
        arrays = self.reader.read_many(self.stream.variables, window)
        sel = self.stream.task.selections[self.stream.part]  # the part's region and time
        selection = tuple(mask[w] for mask, w in zip((sel.time, sel.lat, sel.lon), window))
        part_mask = self.stream.task.part_mask(self.stream.part, window)
        valid = valid_mask(arrays, selection, part_mask)  # the loader's own mask
        if self.extract:
            return len([a[valid] for a in arrays][-1])
        return int(np.count_nonzero(valid))

    def run(self) -> tuple[int, float]:
        """(pairs, seconds) of one pass with the stream's number of threads."""
        start = time.perf_counter()
        with ThreadPoolExecutor(self.stream.threads) as pool:
            pairs = sum(pool.map(self._one, self.stream.chunks))
        return pairs, time.perf_counter() - start


@dataclass
class EpochRun:
    """One consumed epoch: items delivered, the consumer's wait (None where it cannot be
    observed), seconds to the first batch, and the seconds the emulated device held batches."""

    items: int
    stall: float | None
    first: float | None
    busy: float = 0.0


Epoch = Callable[[int], EpochRun]


def _python_epochs(iterate, hold_per_item: float = 0.0) -> Epoch:
    """Epochs consumed by a Python loop; with `hold_per_item` the loop holds each batch for
    its items times that (an emulated accelerator step: a sleep, which releases the GIL)."""

    def epoch(index: int) -> EpochRun:
        run = EpochRun(0, 0.0, None)
        start = time.perf_counter()
        batches = iter(iterate(index))
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            got = time.perf_counter()
            run.stall += got - asked
            if batch is None:
                return run
            if run.first is None:
                run.first = got - start
            n = len(batch[1])  # pixels: pairs; patches: windows
            run.items += n
            if hold_per_item:
                time.sleep(n * hold_per_item)
                run.busy += time.perf_counter() - got

    return epoch


def epoch_runner(
    adapter: str, stream: Stream, workers: int = 0, rate: float | None = None
) -> Epoch:
    """epoch index -> one consumed epoch; the framework is imported here, outside timers.
    With `rate` (items/s) the consumer emulates an accelerator of that speed."""
    hold = 1.0 / rate if rate else 0.0
    if adapter == "numpy":
        return _python_epochs(stream.batches, hold)
    if adapter == "torch":
        from cubebench.loading.torch import loader

        return _python_epochs(lambda index: loader(stream, num_workers=workers, epoch=index), hold)
    if adapter == "tf":
        if rate:
            raise ValueError("the emulated accelerator needs the numpy or torch adapter")
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

    def epoch(index: int) -> EpochRun:
        stream.stats.time_to_first_batch_s = None
        items = int(count(batches))
        return EpochRun(items, None, stream.stats.time_to_first_batch_s)

    return epoch


def ratio_interval(log_ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of per-pair ratios and its Student t 95 % interval (from their logs):
    (ratio, low, high); the interval is (nan, nan) with fewer than two pairs."""
    from cubebench.timing import t_quantile

    n = len(log_ratios)
    mean = sum(log_ratios) / n
    if n < 2:
        return math.exp(mean), math.nan, math.nan
    sd = math.sqrt(sum((r - mean) ** 2 for r in log_ratios) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def converged(log_ratios: list[float], target: float = TARGET_HALF_WIDTH) -> bool:
    """The interval lies within ±`target` of the ratio."""
    ratio, low, high = ratio_interval(log_ratios)
    return len(log_ratios) >= 2 and high <= ratio * (1 + target) and low >= ratio * (1 - target)


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
    max_seconds: float = MAX_SECONDS,
) -> dict:
    """One JSON-able row: loader throughput, the reference in the same run, and the costs.

    `epochs` is the fewest measured pairs (reference pass, loader epoch) after the warm-up
    pair; more are added until the ratio's interval is within ±10 % or `max_seconds` have
    passed. Counters (`pairs`, `chunks_decoded`, bytes...) sum the measured epochs.

    On a patch task the items are windows: the reference is the windows of the part over the
    time to decode and mask every chunk they need, so `ratio_to_raw` is what assembling,
    shuffling and batching the windows cost on top of decoding.
    """
    started = time.perf_counter()
    stream = open_stream(
        task,
        part,
        threads=threads,
        batch_size=batch_size,
        buffer_chunks=buffer_chunks,
        reader=reader,
        storage_options=storage_options,
    )
    setup_s = time.perf_counter() - started  # includes loading the compiled kernels
    names = [r for r in available_readers(task.cube) if r != "xarray"] or ["xarray"]
    refs = {
        n: Reference(stream, open_reader(task.cube, n, storage_options, threads=threads))
        for n in names
    }
    patches = isinstance(stream, PatchStream)
    items = "windows" if patches else "pairs"
    per_epoch = task.samples[part]  # windows of a patch task; valid pixels of a pixel task
    by_reader = {}
    for name, ref in refs.items():
        pairs, seconds = ref.run()
        by_reader[name] = (per_epoch if patches else pairs) / seconds
    best = max(by_reader, key=by_reader.get)
    reference = refs[best]
    extract = Reference(stream, reference.reader, extract=True)
    run_epoch = epoch_runner(adapter, stream, workers)

    # the warm-up pair: page cache, thread pools, kernels, tf.data tracing; then counters anew
    reference.run()
    warm = run_epoch(0)
    extract_pairs, extract_seconds = extract.run()
    stream.stats = type(stream.stats)()
    ref_items = ref_seconds = loaded = seconds = 0.0
    stall: float | None = 0.0
    log_ratios: list[float] = []
    measuring = time.perf_counter()
    while True:
        n, s = reference.run()
        n = per_epoch if patches else n
        start = time.perf_counter()
        run = run_epoch(len(log_ratios) + 1)
        took = time.perf_counter() - start
        ref_items, ref_seconds = ref_items + n, ref_seconds + s
        loaded, seconds = loaded + run.items, seconds + took
        stall = None if run.stall is None or stall is None else stall + run.stall
        log_ratios.append(math.log((run.items / took) / (n / s)))
        if len(log_ratios) >= epochs and (
            converged(log_ratios) or time.perf_counter() - measuring > max_seconds
        ):
            break
    ratio, low, high = ratio_interval(log_ratios)
    stats = stream.stats
    workers_used = workers > 0
    measured = len(log_ratios)
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
        "epochs": measured,
        items: int(loaded),
        f"expected_{items}": per_epoch * measured,
        "seconds": round(seconds, 4),
        f"{items}_per_s": loaded / seconds,
        f"raw_decode_{items}_per_s": ref_items / ref_seconds,
        f"raw_extract_{items}_per_s": (per_epoch if patches else extract_pairs) / extract_seconds,
        "raw_reader": best,
        "raw_by_reader": {name: round(rate) for name, rate in by_reader.items()},
        "ratio_to_raw": ratio,
        "ratio_to_raw_ci95": None if math.isnan(low) else [low, high],
        "ratio_converged": converged(log_ratios),
        # with DataLoader workers the chunk-side counters live in the worker processes
        "read_amplification": None if workers_used else stats.read_amplification,
        "chunks_decoded": None if workers_used else stats.chunks_decoded,
        "bytes_read": None if workers_used else stats.bytes_read,
        "bytes_decoded": None if workers_used else stats.bytes_decoded,
        # the process's lifetime peak (KiB on Linux): preparation, raw decode and the epochs
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "setup_s": round(setup_s, 3),
        "time_to_first_batch_s": warm.first,  # of the first (cold) epoch
        "stall_fraction": None if stall is None else stall / seconds,
    }
    if patches and not workers_used:  # decoded bytes per byte of the windows delivered
        t, h, w = stream.window
        window_bytes = loaded * t * h * w * stream.itemsize * len(stream.variables)
        row["decoded_over_window_bytes"] = stats.bytes_decoded / window_bytes
    return row


def emulate(
    task: PreparedTask,
    rate: float,
    part: str = "train",
    batch_size: int = 4096,
    adapter: str = "numpy",
    epochs: int = 1,
    threads: int = 2,
    **options,
) -> dict:
    """The loader feeding an emulated accelerator of `rate` items/s for `epochs` (after a
    warm-up epoch): `accelerator_utilisation` = the seconds the device held batches / wall,
    and `emulated_rate` = items / those seconds (a sleep overshoots a little, so it is
    slightly below `rate`)."""
    stream = open_stream(task, part, threads=threads, batch_size=batch_size, **options)
    return _emulated(epoch_runner(adapter, stream, rate=rate), rate, epochs)


def _emulated(run_epoch: Epoch, rate: float, epochs: int) -> dict:
    run_epoch(0)  # warm-up
    items = busy = wall = 0.0
    for index in range(1, epochs + 1):
        start = time.perf_counter()
        run = run_epoch(index)
        wall += time.perf_counter() - start
        items, busy = items + run.items, busy + run.busy
    return {
        "rate": rate,
        "emulated_rate": items / busy if busy else math.nan,
        "accelerator_utilisation": busy / wall,
        "delivered_per_s": items / wall,
    }


def sweep(
    task: PreparedTask,
    part: str = "train",
    batch_size: int = 4096,
    adapter: str = "numpy",
    epochs: int = 1,
    threads: int = 2,
    probes: int = 7,
    **options,
) -> dict:
    """The highest emulated rate the loader keeps at >= 90 % accelerator utilisation.

    Starts from the loader's own rate with no accelerator (above it the utilisation must
    fall) and bisects in log space between a rate that passed and one that failed, `probes`
    times: the answer is known to within a factor (high / low) ** (1 / 2 ** probes).
    """
    stream = open_stream(task, part, threads=threads, batch_size=batch_size, **options)
    free = _emulated(epoch_runner(adapter, stream), math.inf, epochs)["delivered_per_s"]
    points = []

    def probe(rate: float) -> bool:
        point = _emulated(epoch_runner(adapter, stream, rate=rate), rate, epochs)
        points.append(point)
        return point["accelerator_utilisation"] >= TARGET_UTILISATION

    low, high = free / 8, free * 1.25
    while not probe(low) and low > free / 4096:  # a very slow consumer side: go lower
        high, low = low, low / 8
    for _ in range(probes):
        middle = math.sqrt(low * high)
        if probe(middle):
            low = middle
        else:
            high = middle
    passed = [p for p in points if p["accelerator_utilisation"] >= TARGET_UTILISATION]
    best = max(passed, key=lambda p: p["rate"]) if passed else None
    return {
        "free_running_per_s": free,
        "sustained_rate_at_90": best["rate"] if best else None,
        "utilisation_at_best": best["accelerator_utilisation"] if best else None,
        "bracket": [low, high],
        "points": sorted(points, key=lambda p: p["rate"]),
    }
