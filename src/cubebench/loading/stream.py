"""A shuffled batch stream over one part of a prepared task, read chunk by chunk.

Each epoch reads every chunk holding cells of the part once, decodes several chunks concurrently
in threads (the codecs release the GIL), masks invalid pixels and other parts' cells (a chunk
the split shares between parts) and normalises *inside the worker thread*
(where the chunk is still in cache), shuffles through a buffer of K chunks with a per-epoch
seed, and emits contiguous float32 batches. There is no per-sample Python.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Self

import numpy as np

from cubebench.cube.integrity import chunk_error
from cubebench.errors import ChunkReadError
from cubebench.loading.kernels import chunk_records, copy_runs, warm_up
from cubebench.loading.readers import ChunkReader, open_reader
from cubebench.task import PreparedTask

ChunkIndex = tuple[int, int, int]


@dataclass
class LoadStats:
    """What loading cost. Chunk-side counters are summed over decode threads."""

    chunks_decoded: int = 0
    bytes_read: int = 0  # compressed bytes from the store
    bytes_decoded: int = 0
    # per epoch, over this stream's chunks: the bytes of their cells that lie in the part's
    # blocks and selection (box, time range), of every variable read; see the streams
    bytes_needed: int = 0
    samples: int = 0
    batches: int = 0
    decode_seconds: float = 0.0  # summed over threads: read + decode + mask + normalise
    stall_seconds: float = 0.0  # time the consumer waited inside the stream for a batch
    time_to_first_batch_s: float | None = None
    wall_seconds: float = 0.0
    epochs: int = 0

    @property
    def read_amplification(self) -> float:
        """Decoded bytes / bytes the epochs needed (`bytes_needed`: of each decoded chunk, its
        cells in the part's selection times the part's share of the chunk, invalid pixels
        included; `PreparedTask.needed_cells`).

        1.0: every decoded byte is the part's, as for a `chunks` split or a time split on one
        time step per chunk; about 1 / the part's share: the chunks are shared by the parts
        (a physical split on large chunks: each part decodes the others' cells too); above 1
        also where chunks straddle the selection's border (a box edge inside a chunk row).
        """
        return self.bytes_decoded / self.bytes_needed if self.bytes_needed else float("nan")

    @property
    def stall_fraction(self) -> float:
        return self.stall_seconds / self.wall_seconds if self.wall_seconds else float("nan")

    def __add__(self, other: LoadStats) -> LoadStats:
        """Both costs together (several streams, or DDP ranks); the first's first batch."""
        summed = {
            f.name: getattr(self, f.name) + getattr(other, f.name)
            for f in fields(self)
            if f.name != "time_to_first_batch_s"
        }
        first = self.time_to_first_batch_s
        return LoadStats(
            **summed,
            time_to_first_batch_s=(other.time_to_first_batch_s if first is None else first),
        )

    def _repr_html_(self) -> str:
        """The counters and the derived ratios as a table (Jupyter)."""
        from cubebench.display import facts_table

        rows = asdict(self) | {
            "read_amplification": self.read_amplification,
            "stall_fraction": self.stall_fraction,
        }
        return facts_table(rows, "loading costs")


@dataclass(frozen=True)
class Decoded:
    x: np.ndarray  # (n, F) float32 features
    y: np.ndarray  # (n,) float32 target
    bytes_read: int
    bytes_decoded: int
    seconds: float


class StreamBase:
    """What both streams share: the constructor, its checks, the reader, the target's chunk
    grid, the shard and its batch plan. A subclass names the parts it serves (`parts`), plans
    its epoch (`plan`), counts the part's and the shard's samples (`part_samples`,
    `shard_samples`) and gives an empty batch (`empty_batch`); `batch_size` defaults to the
    subclass's `default_batch_size`."""

    default_batch_size: ClassVar[int]

    def __init__(
        self,
        task: PreparedTask,
        part: str = "train",
        batch_size: int | None = None,
        *,
        shuffle: bool = True,
        buffer_chunks: int = 8,
        threads: int = 2,
        drop_last: bool = False,
        seed: int | None = None,
        reader: str | ChunkReader | None = None,
        storage_options: dict | None = None,
    ):
        parts = self.parts(task)
        if part not in parts:
            raise ValueError(f"unknown part {part!r}; parts: {list(parts)}")
        batch_size = self.default_batch_size if batch_size is None else batch_size
        if batch_size < 1 or buffer_chunks < 1 or threads < 1:
            raise ValueError("batch_size, buffer_chunks and threads must be positive")
        self.task, self.part, self.batch_size = task, part, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.buffer_chunks, self.threads = buffer_chunks, threads
        self.seed = task.spec.seed if seed is None else seed
        self.reader = (
            reader
            if reader is not None and not isinstance(reader, str)
            else open_reader(task.cube, reader, storage_options, threads)
        )
        self.shard_index, self.shard_count = 0, 1
        spec = task.spec
        self.variables = (*spec.inputs, spec.target)
        target = task.cube[spec.target]
        self.chunk_edges = task.chunk_edges
        self.itemsize = target.dtype.itemsize
        self.stats = LoadStats()
        self.plan()

    @staticmethod
    def parts(task: PreparedTask) -> Collection[str]:
        raise NotImplementedError

    def plan(self) -> None:
        raise NotImplementedError

    def chunk_slices(self, chunk: ChunkIndex) -> tuple[slice, slice, slice]:
        return self.task.chunk_slices(chunk)

    def shard(self, index: int, count: int) -> Self:
        """Restrict to shard `index` of `count` (set in each DataLoader worker / DDP rank).

        The shards together yield every sample of the part exactly once per epoch, their
        shares balanced by samples (how is the subclass's epoch order), and with `count` > 1
        every shard yields the same number of batches, `steps_per_epoch()`, of balanced sizes
        (`batch_sizes`): DDP ranks step together.
        """
        if not 0 <= index < count:
            raise ValueError(f"shard {index} of {count}")
        self.shard_index, self.shard_count = index, count
        return self

    def part_samples(self) -> int:
        """The part's samples: what one epoch of all the shards together yields."""
        raise NotImplementedError

    def shard_samples(self, epoch: int = 0) -> int:
        """The samples of this shard's share of `epoch` (before `drop_last`)."""
        raise NotImplementedError

    def empty_batch(self) -> tuple[np.ndarray, ...]:
        """A batch of no samples with the trailing shapes and dtypes of a real one."""
        raise NotImplementedError

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """How many batches `batches(epoch)` yields on this shard: ceil(N / (B * count)) with
        N the part's samples, B `batch_size` and `count` the shards (floor with `drop_last`).

        A single shard yields batches of B and then the remainder, as ever; with `count` > 1
        every shard yields exactly this many, the same on every shard and every epoch.
        """
        per_step = self.batch_size * self.shard_count
        n = self.part_samples()
        return n // per_step if self.drop_last else -(-n // per_step)

    def batch_sizes(self, epoch: int = 0) -> list[int] | None:
        """This shard's batch sizes in `epoch` when sharded (`count` > 1), else None.

        `steps_per_epoch()` sizes differing by at most one that add up to the shard's samples
        (so a size may exceed `batch_size` by a little where the shard's share is above the
        mean); with `drop_last` they add up to at most `steps * batch_size` and the rest is
        dropped. A size 0 is an empty batch, still a step.
        """
        if self.shard_count == 1:
            return None
        steps = self.steps_per_epoch(epoch)
        if not steps:
            return []
        n = self.shard_samples(epoch)
        if self.drop_last:
            n = min(n, steps * self.batch_size)
        q, r = divmod(n, steps)
        return [q + 1] * r + [q] * (steps - r)

    def needed_bytes(self, chunks: Collection[ChunkIndex]) -> int:
        """What the part needs of `chunks` (`PreparedTask.needed_cells`: a chunk inside the
        part's blocks whole, a shared chunk in proportion to the part's cells in it; within the
        part's box and time range) times the item size, times the variables read."""
        if not hasattr(self, "_needed"):
            self._needed = self.task.needed_cells(self.part)
        cells = sum(float(self._needed[c]) for c in chunks)
        return round(cells * self.itemsize * len(self.variables))


class ChunkStream(StreamBase):
    """Batches `(X[B, F], y[B])` of one part, every valid sample exactly once per epoch.

    `shard(i, n)` restricts the stream to a share of the epoch's chunks, dealt by their valid
    samples (`epoch_chunks`): n consumers (torch DataLoader workers, DDP ranks) together see
    each chunk once, and each yields `steps_per_epoch()` batches.

    A chunk holding cells of several parts (a split that does not follow the chunks) is read
    by each part's stream and masked to the part. `stats.bytes_needed` adds, per epoch, what
    the part needs of this shard's chunks (`needed_bytes`): a read amplification of 1 when
    every chunk lies in one part's blocks inside its selection, about 1 / the part's share of
    the cells when every chunk is shared (a time split on a time-series layout), and above 1
    where a box cuts through chunks.
    """

    default_batch_size = 4096

    @staticmethod
    def parts(task: PreparedTask) -> Collection[str]:
        return task.blocks

    def plan(self) -> None:
        self.chunks = self._part_chunks()
        counts = self.task.chunk_samples[self.part]
        self.chunk_counts = {c: int(counts.get(c, 0)) for c in self.chunks}
        self._prepare_constants()
        dtype = np.result_type(*(self.task.cube[v].dtype for v in self.variables))
        warm_up(len(self.variables), dtype, len(self.coord_axis))

    # --- which chunks -------------------------------------------------------------------

    def _part_chunks(self) -> list[ChunkIndex]:
        """Chunks holding cells of the part's blocks inside its selection, in C order."""
        return self.task.part_chunks(self.part)

    def epoch_chunks(self, epoch: int) -> list[ChunkIndex]:
        """This shard's chunks in this epoch's order.

        The epoch's permutation is the same for every shard; with several shards it is dealt
        chunk by chunk, in its order, to the shard with the fewest samples so far (then the
        fewest chunks, then the lowest index), so the shares differ by at most one chunk's
        samples and every shard computes the same deal.
        """
        order = list(self.chunks)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, 1])
            order = [order[i] for i in rng.permutation(len(order))]
        if self.shard_count == 1:
            return order
        shares = deal([self.chunk_counts[c] for c in order], self.shard_count)
        return [order[i] for i in shares[self.shard_index]]

    def part_samples(self) -> int:
        return sum(self.chunk_counts.values())

    def shard_samples(self, epoch: int = 0) -> int:
        return sum(self.chunk_counts[c] for c in self.epoch_chunks(epoch))

    def empty_batch(self) -> tuple[np.ndarray, np.ndarray]:
        features = len(self.task.spec.features)
        return np.empty((0, features), np.float32), np.empty(0, np.float32)

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
        axis_of = {"lat": 1, "lon": 2, "sin_doy": 0, "cos_doy": 0}  # time, lat, lon
        names = task.spec.coord_features
        self.coord_axis = np.array([axis_of[name] for name in names], np.int64)
        # per-axis tables of the coordinate features, normalised once
        self.coord_tables = [
            ((raw[name] - task.feature_mean[j]) / task.feature_std[j]).astype(np.float32)
            for j, name in enumerate(names, start=n_inputs)
        ]

    def decode(self, chunk: ChunkIndex, epoch: int | None = None) -> Decoded:
        """Read, mask and normalise one chunk: float32 (X[n, F], y[n]) of its valid samples.

        With an `epoch`, the samples come permuted by a seed of (seed, epoch, chunk): the
        per-chunk half of the shuffle runs here, in the decode thread, while the chunk is in
        cache, and does not depend on thread timing.
        """
        start = time.perf_counter()
        window = self.chunk_slices(chunk)
        arrays = read_chunk(self.reader, self.task.cube, self.variables, chunk, window)
        sel = self.task.selections[self.part]
        selection = tuple(mask[w] for mask, w in zip((sel.time, sel.lat, sel.lon), window))
        part_mask = self.task.part_mask(self.part, window)  # None: the chunk is the part's
        # the coordinate features along this chunk's window, one row per feature
        coord_table = np.zeros(
            (len(self.coord_axis), max(w.stop - w.start for w in window)), np.float32
        )
        for c, (axis, table) in enumerate(zip(self.coord_axis, self.coord_tables)):
            w = window[axis]
            coord_table[c, : w.stop - w.start] = table[w]
        seed = None
        if epoch is not None and self.shuffle:
            sequence = np.random.SeedSequence([self.seed, epoch, *chunk])
            seed = int(sequence.generate_state(1, np.uint64)[0])
        x, y = chunk_records(
            arrays,
            selection,
            self.mean,
            self.inv_std,
            self.coord_axis,
            coord_table,
            seed,
            part_mask,
        )
        stored = [self.reader.stored_nbytes(v, chunk) for v in self.variables]
        return Decoded(
            x,
            y,
            sum(s or 0 for s in stored),
            sum(a.nbytes for a in arrays),
            time.perf_counter() - start,
        )

    # --- the stream ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.batches(0)

    def group_count(self, epoch: int = 0) -> int:
        """How many groups `groups(epoch)` yields (some may be empty)."""
        return -(-len(self.epoch_chunks(epoch)) // self.buffer_chunks)

    def groups(self, epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch as `group_count` groups of samples: each is K chunks (the buffer) mixed.

        Shuffling has two halves: each chunk's samples are permuted in its decode thread, and
        the K chunks of a group are interleaved so that every stretch of the group draws from
        all K in proportion to their sizes (`mix`). Batches are then contiguous slices of
        the groups' sequence: a global random gather over the buffer would cost as much as
        decoding (it is bound by memory latency). Updates the chunk-side `stats`.

        The mixing runs in the pool too, as a task queued behind its group's decodes (the
        pool's queue is FIFO, so when it starts they have all started: it waits for no task
        that has not), so the consumer only slices: with more threads the whole pipeline
        scales, not only the decoding. Up to `ahead` groups are under way while the
        consumer drains one, which bounds memory.
        """
        stats = self.stats
        chunks = self.epoch_chunks(epoch)
        stats.bytes_needed += self.needed_bytes(chunks)  # this shard's chunks, once
        k = self.buffer_chunks
        todo = iter([chunks[i : i + k] for i in range(0, len(chunks), k)])
        ahead = max(2, -(-self.threads // k) + 1)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="cubebench-decode") as pool:
            pending: deque[tuple[list[Future[Decoded]], Future]] = deque()

            def top_up() -> None:
                while len(pending) < ahead:
                    group = next(todo, None)
                    if group is None:
                        return
                    decodes = [pool.submit(self.decode, chunk, epoch) for chunk in group]
                    pending.append((decodes, pool.submit(self._mixed, decodes)))

            top_up()
            try:
                while pending:
                    decodes, mixed = pending.popleft()
                    group = mixed.result()
                    top_up()
                    for future in decodes:
                        decoded = future.result()
                        stats.chunks_decoded += 1
                        stats.bytes_read += decoded.bytes_read
                        stats.bytes_decoded += decoded.bytes_decoded
                        stats.decode_seconds += decoded.seconds
                    yield group
            finally:  # the consumer stopped early: skip tasks not yet started
                for decodes, mixed in pending:
                    for future in (*decodes, mixed):
                        future.cancel()

    def _mixed(self, decodes: list[Future[Decoded]]) -> tuple[np.ndarray, np.ndarray]:
        """One group: its chunks' samples mixed (shuffling) or in order."""
        parts = [(d.x, d.y) for d in (future.result() for future in decodes)]
        # a batch spans several stretches: it draws from all K chunks
        stretch = max(1, self.batch_size // 4)
        return mix(parts, stretch) if self.shuffle else concatenate(parts)

    def batches(self, epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch of `(X[B, F], y[B])` batches cut from the groups; updates `self.stats`.

        `steps_per_epoch(epoch)` of them; when sharded, of the sizes `batch_sizes(epoch)`.
        """
        return cut_batches(
            self.groups(epoch),
            self.batch_size,
            self.drop_last,
            self.stats,
            self.batch_sizes(epoch),
            self.empty_batch(),
        )


def deal(sizes: Sequence[int], count: int) -> list[list[int]]:
    """Items (by index) dealt in order, each to the share with the fewest samples so far
    (then the fewest items, then the lowest index): `count` lists of indices in order.

    Shares differ by at most the largest item's samples; deterministic.
    """
    heap = [(0, 0, i) for i in range(count)]
    shares: list[list[int]] = [[] for _ in range(count)]
    for k, n in enumerate(sizes):
        load, taken, i = heapq.heappop(heap)
        shares[i].append(k)
        heapq.heappush(heap, (load + int(n), taken + 1, i))
    return shares


def cut_batches(
    groups: Iterator[tuple[np.ndarray, ...]],
    size: int,
    drop_last: bool,
    stats: LoadStats,
    sizes: Sequence[int] | None = None,
    empty: tuple[np.ndarray, ...] | None = None,
) -> Iterator[tuple[np.ndarray, ...]]:
    """Batches of `size` items cut from a sequence of groups (tuples of arrays of equal
    length); counts the epoch, samples, batches, the consumer's wait and the wall time.

    A batch is a view into its group, copied only where it spans two groups. The last,
    partial batch is kept unless `drop_last`.

    With `sizes` (a shard's plan, `StreamBase.batch_sizes`) exactly `len(sizes)` batches
    come instead, batch k of `sizes[k]` items; the last takes every item left (with
    `drop_last`, at most its size). Where the groups run short a batch is shorter or
    `empty` (no items, the right trailing shapes): the number of batches never changes.
    """
    stats.epochs += 1
    started = waiting = time.perf_counter()

    def emit(batch: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        stats.stall_seconds += time.perf_counter() - waiting
        if stats.time_to_first_batch_s is None:
            stats.time_to_first_batch_s = time.perf_counter() - started
        stats.samples += len(batch[0])
        stats.batches += 1
        return batch

    if sizes is not None:
        for batch in _planned_batches(groups, sizes, drop_last, empty):
            yield emit(batch)
            waiting = time.perf_counter()
        stats.stall_seconds += time.perf_counter() - waiting
        stats.wall_seconds += time.perf_counter() - started
        return

    carry: list[tuple[np.ndarray, ...]] = []  # pieces of a batch under way
    carried = 0
    for group in groups:
        n, at = len(group[0]), 0
        if carried:
            at = min(size - carried, n)
            carry.append(tuple(a[:at] for a in group))
            carried += at
            if carried < size:
                continue
            yield emit(concatenate(carry))
            waiting = time.perf_counter()
            carry, carried = [], 0
        while n - at >= size:
            yield emit(tuple(a[at : at + size] for a in group))
            waiting = time.perf_counter()
            at += size
        if at < n:
            carry, carried = [tuple(a[at:] for a in group)], n - at
    if carried and not drop_last:
        yield emit(concatenate(carry))
        waiting = time.perf_counter()
    stats.stall_seconds += time.perf_counter() - waiting
    stats.wall_seconds += time.perf_counter() - started


def _planned_batches(
    groups: Iterator[tuple[np.ndarray, ...]],
    sizes: Sequence[int],
    drop_last: bool,
    empty: tuple[np.ndarray, ...] | None,
) -> Iterator[tuple[np.ndarray, ...]]:
    """`len(sizes)` batches of the given sizes cut from the groups (see `cut_batches`)."""
    if not sizes:
        return  # no step this epoch: nothing to decode
    pieces: deque[tuple[np.ndarray, ...]] = deque()
    held = 0
    template = empty

    def take(m: int) -> tuple[np.ndarray, ...]:
        nonlocal held
        out = []
        while m > 0 and pieces:
            piece = pieces[0]
            n = len(piece[0])
            if n <= m:
                out.append(pieces.popleft())
            else:
                out.append(tuple(a[:m] for a in piece))
                pieces[0] = tuple(a[m:] for a in piece)
            took = min(n, m)
            held -= took
            m -= took
        if not out:
            assert template is not None, "an empty batch needs a template"
            return tuple(a[:0] for a in template)
        return out[0] if len(out) == 1 else concatenate(out)

    k, last = 0, len(sizes) - 1
    for group in groups:
        if template is None:
            template = group
        if len(group[0]):
            pieces.append(group)
            held += len(group[0])
        while k < last and held >= sizes[k]:
            yield take(sizes[k])
            k += 1
    while k < last:
        yield take(sizes[k])
        k += 1
    yield take(min(sizes[last], held) if drop_last else held)


def read_chunk(
    reader: ChunkReader,
    cube,
    variables: tuple[str, ...],
    chunk: ChunkIndex,
    window: tuple[slice, slice, slice],
) -> list[np.ndarray]:
    """Every variable on one chunk; a chunk that cannot be read is named in the error."""
    try:
        return reader.read_many(variables, window)
    except Exception as error:
        for var in variables:  # which one? read them alone
            try:
                reader.read(var, window)
            except Exception as alone:
                raise ChunkReadError(chunk_error(cube, var, chunk, alone)) from None
        # the error did not repeat variable by variable (a truncated blosc buffer can decode
        # past its end): name them all, and the chunk
        message = chunk_error(cube, "/".join(variables), chunk, error, key_of=variables[0])
        raise ChunkReadError(message) from None


def aligned_empty(shape: tuple[int, ...], dtype=np.float32, alignment: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary: TensorFlow wraps such
    an array without copying it (it copies any other one)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def concatenate(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Pieces of groups or batches joined, array by array."""
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def mix(
    parts: list[tuple[np.ndarray, np.ndarray]], stretch: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Interleave shuffled parts so that every `stretch` samples of the result draw from each
    part in proportion to its size (part k gives samples floor(n_k * m / N) of the first m).

    The result is built by copying contiguous runs (a few hundred samples each), which
    streams through memory instead of chasing random addresses.
    """
    sizes = np.array([len(part_y) for _, part_y in parts], np.int64)
    total = int(sizes.sum())
    if len(parts) < 2 or total == 0:
        return concatenate(parts)
    rounds = max(1, total // stretch)
    marks = np.arange(rounds + 1, dtype=np.int64) * total // rounds
    cuts = sizes[None, :] * marks[:, None] // total  # (rounds + 1, K); last row = sizes
    lengths = np.diff(cuts, axis=0)  # (rounds, K): what each part gives each round
    targets = (np.cumsum(lengths.ravel()) - lengths.ravel()).reshape(lengths.shape)
    # one contiguous row per part (the layout the kernel was compiled for)
    cuts, lengths, targets = (np.ascontiguousarray(a.T) for a in (cuts[:-1], lengths, targets))
    out_x = aligned_empty((total, parts[0][0].shape[1]))
    out_y = aligned_empty((total,))
    for k, (x, y) in enumerate(parts):  # straight from each part: no concatenated copy
        copy_runs(x, y, cuts[k], lengths[k], targets[k], out_x, out_y)
    return out_x, out_y


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
