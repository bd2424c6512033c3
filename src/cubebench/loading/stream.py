"""A chunk-aligned, shuffled batch stream over one part of a prepared task.

Each epoch reads every chunk of the part once, decodes several chunks concurrently in threads
(the codecs release the GIL), masks invalid pixels and normalises *inside the worker thread*
(where the chunk is still in cache), shuffles through a buffer of K chunks with a per-epoch
seed, and emits contiguous float32 batches. There is no per-sample Python.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cubebench.loading.readers import ChunkReader, open_reader
from cubebench.task import PreparedTask

ChunkIndex = tuple[int, int, int]


@dataclass
class LoadStats:
    """What loading cost. Chunk-side counters are summed over decode threads."""

    chunks_decoded: int = 0
    bytes_read: int = 0  # compressed bytes from the store
    bytes_decoded: int = 0
    bytes_needed: int = 0  # decoded bytes of the chunks each epoch had to read: the minimum
    samples: int = 0
    batches: int = 0
    decode_seconds: float = 0.0  # summed over threads: read + decode + mask + normalise
    stall_seconds: float = 0.0  # time the consumer waited inside the stream for a batch
    time_to_first_batch_s: float | None = None
    wall_seconds: float = 0.0
    epochs: int = 0

    @property
    def read_amplification(self) -> float:
        """Decoded bytes / bytes of the chunks the epochs needed: 1.0 = no chunk twice."""
        return self.bytes_decoded / self.bytes_needed if self.bytes_needed else float("nan")

    @property
    def stall_fraction(self) -> float:
        return self.stall_seconds / self.wall_seconds if self.wall_seconds else float("nan")


@dataclass(frozen=True)
class Decoded:
    xy: np.ndarray  # (n, F + 1) float32 records: features, then the target
    bytes_read: int
    bytes_decoded: int
    seconds: float

    @property
    def x(self) -> np.ndarray:
        return self.xy[:, :-1]

    @property
    def y(self) -> np.ndarray:
        return self.xy[:, -1]


class ChunkStream:
    """Batches `(X[B, F], y[B])` of one part, every valid sample exactly once per epoch.

    `shard(i, n)` restricts the stream to every n-th chunk of the epoch order: n consumers
    (torch DataLoader workers, DDP ranks) together see each chunk once.
    """

    def __init__(
        self,
        task: PreparedTask,
        part: str = "train",
        batch_size: int = 4096,
        *,
        shuffle: bool = True,
        buffer_chunks: int = 8,
        threads: int = 2,
        drop_last: bool = False,
        seed: int | None = None,
        reader: str | ChunkReader | None = None,
        storage_options: dict | None = None,
    ):
        if part not in task.blocks:
            raise ValueError(f"unknown part {part!r}; parts: {list(task.blocks)}")
        if batch_size < 1 or buffer_chunks < 1 or threads < 1:
            raise ValueError("batch_size, buffer_chunks and threads must be positive")
        self.task = task
        self.part = part
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.buffer_chunks = buffer_chunks
        self.threads = threads
        self.drop_last = drop_last
        self.seed = task.spec.seed if seed is None else seed
        self.reader = (
            reader
            if reader is not None and not isinstance(reader, str)
            else open_reader(task.cube, reader, storage_options)
        )
        self.shard_index, self.shard_count = 0, 1
        spec = task.spec
        self.variables = (*spec.inputs, spec.target)
        target = task.cube[spec.target]
        self.chunk_edges = [np.concatenate([[0], np.cumsum(c)]) for c in target.chunks]
        self.chunks = self._part_chunks()
        self.itemsize = target.dtype.itemsize
        self.stats = LoadStats()
        self._prepare_constants()

    # --- which chunks -------------------------------------------------------------------

    def _part_chunks(self) -> list[ChunkIndex]:
        """Chunks inside the part's blocks that overlap the part's selection, in C order."""
        sel = self.task.selections[self.part]
        out = []
        for block in self.task.blocks[self.part]:
            windows = self.task.block_slices(block)
            ranges = [
                range(
                    int(np.searchsorted(e, w.start)),
                    int(np.searchsorted(e, w.stop)),
                )
                for e, w in zip(self.chunk_edges, windows)
            ]
            for idx in np.ndindex(*(len(r) for r in ranges)):
                chunk = tuple(r[i] for r, i in zip(ranges, idx))
                if sel.any_in(*self.window(chunk)):
                    out.append(chunk)
        return sorted(out)

    def window(self, chunk: ChunkIndex) -> tuple[slice, slice, slice]:
        return tuple(  # type: ignore[return-value]
            slice(int(e[i]), int(e[i + 1])) for e, i in zip(self.chunk_edges, chunk)
        )

    def _bytes(self, chunks: list[ChunkIndex]) -> int:
        per_var = sum(int(np.prod([w.stop - w.start for w in self.window(c)])) for c in chunks)
        return per_var * self.itemsize * len(self.variables)

    def shard(self, index: int, count: int) -> ChunkStream:
        """Restrict to shard `index` of `count` (set in each worker / rank)."""
        if not 0 <= index < count:
            raise ValueError(f"shard {index} of {count}")
        self.shard_index, self.shard_count = index, count
        return self

    def epoch_chunks(self, epoch: int) -> list[ChunkIndex]:
        """This shard's chunks in this epoch's order (the same permutation for every shard)."""
        order = list(self.chunks)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, 1])
            order = [order[i] for i in rng.permutation(len(order))]
        return order[self.shard_index :: self.shard_count]

    # --- decoding -----------------------------------------------------------------------

    def _prepare_constants(self) -> None:
        task = self.task
        # inputs then target: the order of `self.variables`
        n_inputs = len(task.spec.inputs)
        self.mean = np.append(task.feature_mean[:n_inputs], task.target_mean).astype(np.float32)
        std = np.append(task.feature_std[:n_inputs], task.target_std)
        self.inv_std = (1.0 / std).astype(np.float32)
        c = task.coords
        raw = {"lat": c.lat, "lon": c.lon, "sin_doy": np.sin(c.season), "cos_doy": np.cos(c.season)}
        axes = {"lat": "lat", "lon": "lon", "sin_doy": "time", "cos_doy": "time"}
        # per-axis tables of the coordinate features, normalised once
        self.coord_values = {
            name: (
                axes[name],
                ((raw[name] - task.feature_mean[j]) / task.feature_std[j]).astype(np.float32),
            )
            for j, name in enumerate(task.spec.coord_features, start=n_inputs)
        }

    def decode(self, chunk: ChunkIndex, epoch: int | None = None) -> Decoded:
        """Read, mask and normalise one chunk: float32 (X[n, F], y[n]) of its valid samples.

        With an `epoch`, the samples come permuted by a seed of (seed, epoch, chunk): the
        per-chunk half of the shuffle runs here, in the decode thread, while the chunk is in
        cache, and does not depend on thread timing.
        """
        start = time.perf_counter()
        window = self.window(chunk)
        ts, ys, xs = window
        arrays = [self.reader.read(v, window) for v in self.variables]
        valid = np.isfinite(arrays[0])
        for a in arrays[1:]:
            valid &= np.isfinite(a)
        sel = self.task.selections[self.part]
        st, sy, sx = sel.time[ts], sel.lat[ys], sel.lon[xs]
        if not (st.all() and sy.all() and sx.all()):
            valid &= st[:, None, None] & sy[None, :, None] & sx[None, None, :]
        flat = np.flatnonzero(valid)  # sorted: the gathers below read memory in order
        _, ny, nx = valid.shape
        n_features = len(self.task.spec.features)
        xy = np.empty((len(flat), n_features + 1), np.float32)
        for j, a in enumerate(arrays):
            column = np.take(a.reshape(-1), flat)
            column -= self.mean[j]
            column *= self.inv_std[j]
            xy[:, n_features if j == len(arrays) - 1 else j] = column
        if self.task.spec.coord_features:
            t_local, in_plane = np.divmod(flat, ny * nx)
            local = {"time": t_local, "lat": in_plane // nx, "lon": in_plane % nx}
            origin = {"time": ts.start, "lat": ys.start, "lon": xs.start}
            for j, name in enumerate(self.task.spec.coord_features, start=len(arrays) - 1):
                axis, table = self.coord_values[name]  # already normalised
                xy[:, j] = np.take(table[origin[axis] :], local[axis])
        if epoch is not None and self.shuffle:
            # one gather of whole records, in cache: far cheaper than permuting every column
            order = np.random.default_rng([self.seed, epoch, *chunk]).permutation(len(flat))
            xy = np.take(xy, order, axis=0)
        stored = [self.reader.stored_nbytes(v, chunk) for v in self.variables]
        return Decoded(
            xy,
            sum(s or 0 for s in stored),
            sum(a.nbytes for a in arrays),
            time.perf_counter() - start,
        )

    # --- the stream ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.batches(0)

    def batches(self, epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch of batches; updates `self.stats`.

        Shuffling has two halves: each chunk's samples are permuted in its decode thread, and
        every batch draws from the K chunks of the buffer in proportion to what each has left.
        A batch therefore mixes K chunks, every sample is emitted exactly once, and the
        consumer only copies contiguous slices (a global gather over the buffer would cost as
        much as decoding: it is bound by memory latency).
        """
        stats = self.stats
        stats.epochs += 1
        started = waiting = time.perf_counter()
        rng = np.random.default_rng([self.seed, epoch, 2])
        chunks = self.epoch_chunks(epoch)
        stats.bytes_needed += self._bytes(chunks)  # this shard's chunks, once
        todo = iter(chunks)
        lookahead = self.buffer_chunks + self.threads
        active: list[list] = []  # [records, position] of the chunks in the buffer
        n_features = len(self.task.spec.features)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="cubebench-decode") as pool:
            pending: deque[Future[Decoded]] = deque()

            def top_up() -> None:
                while len(pending) < lookahead:
                    chunk = next(todo, None)
                    if chunk is None:
                        return
                    pending.append(pool.submit(self.decode, chunk, epoch))

            def take_decoded() -> None:
                decoded = pending.popleft().result()
                top_up()
                stats.chunks_decoded += 1
                stats.bytes_read += decoded.bytes_read
                stats.bytes_decoded += decoded.bytes_decoded
                stats.decode_seconds += decoded.seconds
                if len(decoded.xy):
                    active.append([decoded.xy, 0])

            top_up()
            while True:
                while pending and (
                    len(active) < self.buffer_chunks
                    or sum(len(c[0]) - c[1] for c in active) < self.batch_size
                ):
                    take_decoded()
                left = np.array([len(c[0]) - c[1] for c in active], dtype=np.int64)
                total = int(left.sum())
                if total == 0 or (total < self.batch_size and self.drop_last):
                    break
                size = min(self.batch_size, total)
                counts = self._split_batch(left, size, rng)
                bx = np.empty((size, n_features), np.float32)
                by = np.empty(size, np.float32)
                filled = 0
                for c, k in zip(active, counts):
                    if k:
                        records = c[0][c[1] : c[1] + k]
                        bx[filled : filled + k] = records[:, :-1]
                        by[filled : filled + k] = records[:, -1]
                        c[1] += k
                        filled += k
                active = [c for c in active if c[1] < len(c[0])]
                stats.stall_seconds += time.perf_counter() - waiting
                if stats.time_to_first_batch_s is None:
                    stats.time_to_first_batch_s = time.perf_counter() - started
                stats.samples += size
                stats.batches += 1
                yield bx, by
                waiting = time.perf_counter()
            for future in pending:  # drop_last ended early: skip decodes not yet started
                future.cancel()
        stats.stall_seconds += time.perf_counter() - waiting
        stats.wall_seconds += time.perf_counter() - started

    def _split_batch(self, left: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        """How many samples each buffered chunk gives to a batch: proportional to what it has
        left, the remainder handed out at random to chunks that still have samples."""
        if not self.shuffle:  # in order: drain chunks one after another
            counts = np.zeros_like(left)
            need = size
            for i, n in enumerate(left):
                counts[i] = min(n, need)
                need -= counts[i]
            return counts
        counts = left * size // int(left.sum())
        short = size - int(counts.sum())
        while short:
            spare = np.flatnonzero(counts < left)
            pick = rng.choice(spare, size=min(short, len(spare)), replace=False)
            counts[pick] += 1
            short -= len(pick)
        return counts


def materialize(
    task: PreparedTask,
    part: str = "train",
    max_samples: int | None = None,
    seed: int | None = None,
    **stream_options,
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded uniform subsample of a part, in memory (for in-memory models such as HGB).

    Memory is bounded by `max_samples`: each chunk keeps only its share of the subsample.
    """
    stream = ChunkStream(task, part, shuffle=False, **stream_options)
    total = task.samples[part]
    rng = np.random.default_rng([task.spec.seed if seed is None else seed, 3])
    keep_all = max_samples is None or max_samples >= total
    chosen = None if keep_all else np.sort(rng.choice(total, size=max_samples, replace=False))
    xs, ys, offset = [], [], 0
    with ThreadPoolExecutor(stream.threads) as pool:
        for decoded in pool.map(stream.decode, stream.chunks):
            n = len(decoded.y)
            if chosen is None:
                xs.append(decoded.x)
                ys.append(decoded.y)
            else:
                lo, hi = np.searchsorted(chosen, [offset, offset + n])
                local = chosen[lo:hi] - offset
                xs.append(decoded.x[local])
                ys.append(decoded.y[local])
            offset += n
    if not xs:
        return np.empty((0, len(task.spec.features)), np.float32), np.empty(0, np.float32)
    return np.concatenate(xs), np.concatenate(ys)
