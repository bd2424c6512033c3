"""A window stream over one part of a patch task: every window once, every chunk decoded once
per epoch, also where windows cross chunk borders.

Windows are grouped by the chunk that holds their origin (a **unit**). A unit needs its own
chunk and, where its windows reach over a border, the next chunks along that axis. Decoded
chunks wait in a cache that counts, for the epoch, how many units still need each one; a chunk
leaves the cache when its last unit is assembled, so no chunk is decoded twice.

The cache stays small because units are visited in C order *within a strip*: a strip is the
set of chunks that share an index on every axis no window crosses (with 1-step windows, a
time slab), and no window needs chunks of two strips. A chunk then waits for at most about one
slab of the strip along its outermost crossed axis (one row of chunks when windows cross
only lat and lon borders). The epoch's order permutes the strips and picks the walk's
direction on every axis; the windows of K consecutive units (the buffer) are then shuffled
together. Shards take contiguous stretches of that walk, balanced by windows. Decoding,
assembling and shuffling all run in the stream's threads (the consumer only cuts batches from
the shuffled groups), so the whole pipeline scales with the threads.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cubebench.loading.stream import StreamBase, concatenate, cut_batches, read_chunk
from cubebench.task import PreparedTask, TaskSpec
from cubebench.windows import hidden_mask

ChunkIndex = tuple[int, int, int]
Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Unit:
    """The windows whose origin lies in one chunk, and every chunk they need."""

    chunk: ChunkIndex
    windows: np.ndarray  # indices into the part's window origins
    needs: tuple[ChunkIndex, ...]


def channel_names(spec: TaskSpec, steps: int) -> list[str]:
    """The channels of `x` for windows of `steps` time steps: per step, the inputs, the
    visible target and its mask, then the coordinate features (`name@k` for step k)."""
    per_step = [*spec.inputs, "visible_lst", "visible", *spec.coord_features]
    return per_step if steps == 1 else [f"{n}@{k}" for k in range(steps) for n in per_step]


class PatchStream(StreamBase):
    """Batches `(x[B, C, h, w], y[B, t, h, w], mask[B, t, h, w])` of a part's windows.

    `x` holds, per time step of the window, the normalised inputs, the visible target
    (`visible_lst`: hidden, missing and unselected pixels are 0) and its mask (`visible`),
    then the normalised coordinate features; NaN inputs are 0. `y` is the normalised target
    (0 where unknown) and `mask` is 1 on the pixels to predict (hidden and valid). Same
    constructor as `ChunkStream`; `buffer_chunks` counts units. A shard takes a contiguous
    stretch of the epoch's walk, balanced by windows (`epoch_units`), and yields
    `steps_per_epoch()` batches; a sample is a window.

    `stats.bytes_needed` adds, per epoch, what the part needs of the chunks this shard's
    windows read (`StreamBase.needed_bytes`: a chunk of the part's blocks whole, a chunk the
    parts share in proportion to the part's cells). Not the windows' union: cells of a needed
    chunk that no kept window covers (windows without targets, windows dropped between parts)
    count as needed, as a chunk's invalid pixels do for pixels, so a `chunks` split over the
    whole cube has exactly 1.
    """

    default_batch_size = 32

    @staticmethod
    def parts(task: PreparedTask) -> Collection[str]:
        if task.spec.patch is None or task.windows is None:
            raise ValueError(f"task {task.spec.name!r} samples pixels: use a ChunkStream")
        return task.windows.origins

    def plan(self) -> None:
        self.patch = self.task.spec.patch
        self.window = tuple(self.patch.size)
        self.origins = self.task.windows.origins[self.part]
        self.units, self.strips = self._units_and_strips()
        self.chunks = sorted({c for u in self.units for c in u.needs})
        self._constants()

    # --- which chunks, in which order ------------------------------------------------------

    def _units_and_strips(self) -> tuple[list[Unit], list[list[int]]]:
        def chunk_of(pixels: np.ndarray) -> np.ndarray:  # (k, 3) pixel -> chunk indices
            columns = [
                np.searchsorted(e, pixels[:, a], "right") - 1
                for a, e in enumerate(self.chunk_edges)
            ]
            return np.stack(columns, axis=1).reshape(-1, 3)

        first = chunk_of(self.origins)
        last = chunk_of(self.origins + np.asarray(self.window) - 1)
        crossed = [a for a in range(3) if (last[:, a] > first[:, a]).any()]
        order = np.lexsort(first.T[::-1])  # C order of the origin chunk, stable
        units: list[Unit] = []
        keys = [tuple(int(v) for v in first[i]) for i in order]
        for chunk, members in itertools.groupby(zip(keys, order), key=lambda p: p[0]):
            windows = np.array([i for _, i in members], np.int64)
            # the chunks some window covers, not the box they span: a corner chunk no window
            # reaches (another part's, on a chunks split) is not decoded for nothing
            spans = np.unique(np.column_stack([first[windows], last[windows]]), axis=0)
            covered = {
                c
                for lo_hi in spans
                for c in itertools.product(
                    *(range(lo, hi + 1) for lo, hi in zip(lo_hi[:3], lo_hi[3:]))
                )
            }
            needs = tuple(sorted(tuple(int(v) for v in c) for c in covered))
            units.append(Unit(chunk, windows, needs))  # type: ignore[arg-type]
        strips: dict[tuple, list[int]] = {}
        for k, unit in enumerate(units):
            strip = tuple(c for a, c in enumerate(unit.chunk) if a not in crossed)
            strips.setdefault(strip, []).append(k)
        return units, list(strips.values())

    def epoch_units(self, epoch: int) -> list[Unit]:
        """This shard's units in this epoch's order.

        Shuffled: the strips are permuted, and inside a strip the units are walked in C order
        with every axis running forwards or backwards by the epoch's draw (either way a chunk
        is needed by units close together in the walk, so the cache stays small).

        With several shards the walk is cut into `count` contiguous stretches, each cut at the
        unit boundary nearest to an equal share of the windows: every shard's share is within
        one unit's windows of the mean, and only chunks at the n - 1 cuts are decoded by two
        shards (none where a cut falls between strips).
        """
        strips = list(self.strips)
        signs = np.ones(3, np.int64)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, 2])
            strips = [strips[i] for i in rng.permutation(len(strips))]
            signs = rng.choice(np.array([-1, 1]), size=3)
        walks = [
            sorted(strip, key=lambda k: tuple(signs * np.asarray(self.units[k].chunk)))
            for strip in strips
        ]
        ordered = [self.units[k] for walk in walks for k in walk]
        if self.shard_count == 1:
            return ordered
        cuts = stretches([len(u.windows) for u in ordered], self.shard_count)
        return ordered[cuts[self.shard_index] : cuts[self.shard_index + 1]]

    def part_samples(self) -> int:
        return len(self.origins)

    def shard_samples(self, epoch: int = 0) -> int:
        return sum(len(u.windows) for u in self.epoch_units(epoch))

    def empty_batch(self) -> Batch:
        t, h, w = self.window
        return (
            np.empty((0, self.channels, h, w), np.float32),
            np.empty((0, t, h, w), np.float32),
            np.empty((0, t, h, w), np.float32),
        )

    # --- decoding and assembly ----------------------------------------------------------------

    def _constants(self) -> None:
        task, spec = self.task, self.task.spec
        n_in = len(spec.inputs)
        self.mean = np.append(task.feature_mean[:n_in], task.target_mean).astype(np.float32)
        self.inv_std = (1.0 / np.append(task.feature_std[:n_in], task.target_std)).astype(
            np.float32
        )
        c = task.coords
        raw = {"lat": c.lat, "lon": c.lon, "sin_doy": np.sin(c.season), "cos_doy": np.cos(c.season)}
        self.coord_tables = {
            name: ((raw[name] - task.feature_mean[j]) / task.feature_std[j]).astype(np.float32)
            for j, name in enumerate(spec.coord_features, start=n_in)
        }
        self.per_step = len(channel_names(spec, 1))
        self.channel_names = channel_names(spec, self.window[0])
        self.channels = len(self.channel_names)

    def decode_planes(self, chunk: ChunkIndex) -> tuple[np.ndarray, int, int, float]:
        """One chunk as float32 (variables..., hidden) planes: (stack, stored, decoded, s)."""
        start = time.perf_counter()
        window = self.chunk_slices(chunk)
        arrays = read_chunk(self.reader, self.task.cube, self.variables, chunk, window)
        stack = np.empty((len(arrays) + 1, *arrays[0].shape), np.float32)
        for k, a in enumerate(arrays):
            stack[k] = a
        stack[-1] = hidden_mask(self.patch, self.task.spec.seed, *window)
        stored = sum(self.reader.stored_nbytes(v, chunk) or 0 for v in self.variables)
        decoded = sum(a.nbytes for a in arrays)
        return stack, stored, decoded, time.perf_counter() - start

    def assemble(self, unit: Unit, chunks: dict[ChunkIndex, np.ndarray]) -> Batch:
        """The unit's windows, cut from the decoded chunks, as (x, y, mask).

        The chunks the unit needs are copied once into one region (its chunk and the margin
        its windows reach into); every window is then gathered from it in one operation.
        """
        origins = self.origins[unit.windows]
        low = np.array([int(e[c]) for e, c in zip(self.chunk_edges, unit.chunk)])
        high = (origins + np.asarray(self.window)).max(axis=0)
        region = np.empty((len(self.variables) + 1, *(high - low)), np.float32)
        for chunk in unit.needs:
            into, out_of = [], []
            for s, lo, hi in zip(self.chunk_slices(chunk), low, high):
                a, b = max(s.start, lo), min(s.stop, hi)
                into.append(slice(a - lo, b - lo))
                out_of.append(slice(a - s.start, b - s.start))
            region[(slice(None), *into)] = chunks[chunk][(slice(None), *out_of)]
        view = np.lib.stride_tricks.sliding_window_view(region, self.window, axis=(1, 2, 3))
        at = (origins - low).T
        return self._features(origins, np.moveaxis(view[:, at[0], at[1], at[2]], 0, 1))

    def _features(self, origins: np.ndarray, raw: np.ndarray) -> Batch:
        k, t, h, w = len(origins), *self.window
        n_in = len(self.variables) - 1
        sel = self.task.selections[self.part]
        steps = origins[:, :1] + np.arange(t)  # (k, t) global indices
        rows = origins[:, 1:2] + np.arange(h)
        cols = origins[:, 2:3] + np.arange(w)
        selected = (
            sel.time[steps][:, :, None, None]
            & sel.lat[rows][:, None, :, None]
            & sel.lon[cols][:, None, None, :]
        )
        target, hidden = raw[:, n_in], raw[:, n_in + 1] > 0.5
        known = np.isfinite(target) & selected
        valid = known.copy()
        x = np.zeros((k, t, self.per_step, h, w), np.float32)
        for j in range(n_in):
            valid &= np.isfinite(raw[:, j])
            x[:, :, j] = np.nan_to_num((raw[:, j] - self.mean[j]) * self.inv_std[j], nan=0.0)
        scaled = (target - self.mean[n_in]) * self.inv_std[n_in]
        visible = known & ~hidden
        x[:, :, n_in] = np.where(visible, scaled, 0.0)
        x[:, :, n_in + 1] = visible
        planes = {
            "lat": lambda table: table[rows][:, None, :, None],
            "lon": lambda table: table[cols][:, None, None, :],
            "sin_doy": lambda table: table[steps][:, :, None, None],
            "cos_doy": lambda table: table[steps][:, :, None, None],
        }
        for j, (name, table) in enumerate(self.coord_tables.items(), start=n_in + 2):
            x[:, :, j] = planes[name](table)
        y = np.where(valid, scaled, 0.0).astype(np.float32)
        mask = (valid & hidden).astype(np.float32)
        return x.reshape(k, self.channels, h, w), y, mask

    # --- the stream -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(0)

    def group_count(self, epoch: int = 0) -> int:
        return -(-len(self.epoch_units(epoch)) // self.buffer_chunks)

    def groups(self, epoch: int = 0) -> Iterator[Batch]:
        """One epoch as `group_count` groups: the windows of K units, shuffled together."""
        stats = self.stats
        units = self.epoch_units(epoch)
        uses = Counter(c for u in units for c in u.needs)
        stats.bytes_needed += self.needed_bytes(set(uses))  # this shard's chunks, once
        cache: dict[ChunkIndex, Future] = {}
        lock = threading.Lock()

        def build(unit: Unit) -> Batch:
            chunks = {c: cache[c].result()[0] for c in unit.needs}
            batch = self.assemble(unit, chunks)
            with lock:
                for c in unit.needs:
                    uses[c] -= 1
                    if not uses[c]:
                        del cache[c]  # its last unit is assembled: never needed again
            return batch

        def decoded(future: Future) -> None:
            if future.cancelled() or future.exception() is not None:
                return
            _, stored, nbytes, seconds = future.result()
            with lock:
                stats.chunks_decoded += 1
                stats.bytes_read += stored
                stats.bytes_decoded += nbytes
                stats.decode_seconds += seconds

        # the windows of K units are one group, assembled and shuffled in the pool too: each
        # task is queued behind the decodes it needs (the queue is FIFO: when it starts, they
        # have all started), so the consumer only slices and every stage scales with threads
        k = self.buffer_chunks
        todo = iter([units[i : i + k] for i in range(0, len(units), k)])
        ahead = max(2, -(-self.threads // k) + 1)
        numbering = itertools.count()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="cubebench-decode") as pool:
            pending: deque[tuple[list[Future[Batch]], Future[Batch]]] = deque()

            def top_up() -> None:
                while len(pending) < ahead:
                    group = next(todo, None)
                    if group is None:
                        return
                    builds = []
                    for unit in group:
                        for c in unit.needs:
                            with lock:
                                missing = c not in cache
                                if missing:
                                    cache[c] = pool.submit(self.decode_planes, c)
                            if missing:
                                cache[c].add_done_callback(decoded)
                        builds.append(pool.submit(build, unit))
                    index = next(numbering)
                    pending.append((builds, pool.submit(self._group, builds, epoch, index)))

            top_up()
            try:
                while pending:
                    _, group = pending.popleft()
                    top_up()
                    yield group.result()
            finally:  # the consumer stopped early: skip work not yet started
                with lock:
                    futures = [f for b, g in pending for f in (*b, g)] + [*cache.values()]
                for future in futures:
                    future.cancel()

    def _group(self, builds: list[Future[Batch]], epoch: int, index: int) -> Batch:
        """One group: its units' windows, shuffled together (seeded by epoch and group, so
        the order does not depend on which thread finishes first)."""
        parts = [future.result() for future in builds]
        if not self.shuffle:
            return concatenate(parts)
        return shuffled(parts, np.random.default_rng([self.seed, epoch, 4, index]))

    def batches(self, epoch: int = 0) -> Iterator[Batch]:
        """One epoch of `(x, y, mask)` batches of `batch_size` windows; updates `stats`.

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


def stretches(sizes: list[int], count: int) -> list[int]:
    """Cut points of `count` contiguous stretches of items of `sizes`, balanced by size: cut
    i is the item boundary nearest to i / count of the total (the lower one on a tie).
    Returns `count + 1` indices, from 0 to `len(sizes)`."""
    cum = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    total = int(cum[-1])
    cuts = [0]
    for i in range(1, count):
        # compare count * cum with i * total: exact in integers
        mark, scaled = i * total, count * cum
        j = int(np.searchsorted(scaled, mark))  # the first boundary at or past the mark
        if j > 0 and mark - scaled[j - 1] <= scaled[j] - mark:
            j -= 1
        cuts.append(max(j, cuts[-1]))
    return [*cuts, len(sizes)]


def shuffled(parts: list[Batch], rng: np.random.Generator) -> Batch:
    """The parts' windows in one random order: each window is written once, straight to a
    random place (a concatenation then a permutation would copy every window twice)."""
    total = sum(len(part[0]) for part in parts)
    places = rng.permutation(total)
    out = tuple(np.empty((total, *a.shape[1:]), a.dtype) for a in parts[0])
    start = 0
    for part in parts:
        where = places[start : start + len(part[0])]
        for target, source in zip(out, part):
            target[where] = source
        start += len(part[0])
    return out  # type: ignore[return-value]
