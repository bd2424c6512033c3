"""The patch geometry: windows kept inside one part, windows across chunk borders equal to a
plain numpy slice of the cube, every window once and every chunk decoded once per epoch, and
the artificial gaps independent of chunking."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from cubebench.errors import TaskError
from cubebench.loading import PatchStream, open_stream
from cubebench.loading.readers import open_reader
from cubebench.splits import Split
from cubebench.task import BUFFER, get_task, prepare_task
from cubebench.windows import Patch, cell_counts, hidden_mask, n_cells, place_windows


@pytest.fixture(scope="module")
def task(tiny):
    """The gap-filling task as it comes: 16 x 16 windows on blocks of 46 days x 64 pixels."""
    return prepare_task(get_task("lst-gapfill"), tiny)


@pytest.fixture(scope="module")
def aligned(tiny):
    """The gap-filling task on blocks of 1 x 2 x 2 storage chunks (`chunks:1,2,2`)."""
    return prepare_task(get_task("lst-gapfill", split="chunks:1,2,2"), tiny)


@pytest.fixture(scope="module")
def buffered(tiny):
    """Windows 3 steps deep on a time split (train, val, test periods) with a buffer of one
    step: the last train step and the last val step are left out."""
    spec = replace(
        get_task("lst-gapfill"), patch=Patch((3, 8, 8), (1, 4, 4)), split=Split("time", buffer=1)
    )
    return prepare_task(spec, tiny)


def touched_blocks(task, origin) -> list[tuple[int, int, int]]:
    """The blocks a window at `origin` touches, from the grid's runs (`grid.edges`)."""
    ranges = [
        range(int(np.searchsorted(e, o, "right") - 1), int(np.searchsorted(e, o + n - 1, "right")))
        for e, o, n in zip(task.grid.edges, origin, task.spec.patch.size)
    ]
    return list(itertools.product(*ranges))


def windows_by_hand(task, tiny):
    """Every window of the stride grid placed on numpy arrays: its target pixels (valid, in
    the selection, hidden) and the parts of the blocks it touches (`part_of_block`; -1, no
    part, is neutral; a buffered block counts as a part of its own). Returns the kept origins
    per part code, the windows dropped (targets, two codes) and, per set of codes touched,
    how many windows with targets touch it."""
    spec, patch = task.spec, task.spec.patch
    target = tiny[spec.target].values
    sel = task.selections[spec.parts[0]]
    valid = np.isfinite(target) & sel.time[:, None, None] & sel.lat[None, :, None]
    valid &= sel.lon[None, None, :]
    for name in spec.inputs:
        valid &= np.isfinite(tiny[name].values)
    hidden = hidden_mask(patch, spec.seed, *(slice(0, n) for n in target.shape))
    targets = valid & hidden
    starts = [range(0, n - s + 1, k) for n, s, k in zip(target.shape, patch.size, patch.step)]
    kept: dict[int, set] = {}
    touching: Counter = Counter()
    for origin in itertools.product(*starts):
        window = tuple(slice(o, o + n) for o, n in zip(origin, patch.size))
        if not targets[window].any():
            continue
        codes = {int(task.part_of_block[b]) for b in touched_blocks(task, origin)} - {-1}
        touching[frozenset(codes)] += 1
        if len(codes) == 1:
            kept.setdefault(codes.pop(), set()).add(origin)
    dropped = sum(n for codes, n in touching.items() if len(codes) > 1)
    return kept, dropped, touching


@pytest.mark.parametrize("which", ["task", "deep", "buffered"])
def test_windows_lie_in_the_blocks_of_one_part(which, tiny, request):
    """Every window a part delivers touches blocks of that part and of no part only (not of
    another part, nor a block a buffer left out); the windows kept and dropped are those a
    window-by-window count on the cube's arrays keeps and drops."""
    prepared = request.getfixturevalue(which)
    parts = prepared.spec.parts
    for code, part in enumerate(parts):
        origins = prepared.windows.origins[part]
        assert len(origins) == prepared.samples[part] > 0
        for origin in origins:
            touched = {int(prepared.part_of_block[b]) for b in touched_blocks(prepared, origin)}
            assert touched - {-1} == {code}
    kept, dropped, touching = windows_by_hand(prepared, tiny)
    for code, part in enumerate(parts):
        assert set(map(tuple, prepared.windows.origins[part].tolist())) == kept[code]
    assert prepared.windows.dropped_across_parts == dropped
    every = [tuple(o) for origins in prepared.windows.origins.values() for o in origins]
    assert len(every) == len(set(every))  # no window in two parts
    if which == "task":  # blocks of 64 pixels from index 0 hold whole 16 x 16 windows
        assert dropped == 0
    else:  # 3 steps deep, windows cross time blocks: some had to go
        assert dropped > 0
    if which == "buffered":  # windows reaching from a part into a buffered step are dropped
        assert BUFFER in prepared.part_of_block
        assert any(BUFFER in codes and len(codes) == 2 for codes in touching)


def reference_window(task, cube_values, origin):
    """(x, y, mask) of one window from whole-cube numpy arrays: the definition."""
    spec, patch = task.spec, task.spec.patch
    t, h, w = patch.size
    sl = tuple(slice(int(o), int(o) + n) for o, n in zip(origin, patch.size))
    inputs = [cube_values[v][sl] for v in spec.inputs]
    target = cube_values[spec.target][sl]
    sel = task.selections["train"]
    selected = sel.time[sl[0], None, None] & sel.lat[None, sl[1], None] & sel.lon[None, None, sl[2]]
    hidden = hidden_mask(patch, spec.seed, *sl)
    valid = np.isfinite(target) & selected
    for a in inputs:
        valid &= np.isfinite(a)
    visible = np.isfinite(target) & selected & ~hidden
    scaled = (target - task.target_mean) / task.target_std
    planes = []
    for k in range(t):
        for j, a in enumerate(inputs):
            z = (a[k] - task.feature_mean[j]) / task.feature_std[j]
            planes.append(np.nan_to_num(z, nan=0.0))
        planes.append(np.where(visible[k], scaled[k], 0.0))
        planes.append(visible[k].astype(float))
        for j, name in enumerate(spec.coord_features, start=len(inputs)):
            raw = {
                "lat": np.broadcast_to(task.coords.lat[sl[1], None], (h, w)),
                "lon": np.broadcast_to(task.coords.lon[None, sl[2]], (h, w)),
                "sin_doy": np.full((h, w), np.sin(task.coords.season[sl[0]][k])),
                "cos_doy": np.full((h, w), np.cos(task.coords.season[sl[0]][k])),
            }[name]
            planes.append((raw - task.feature_mean[j]) / task.feature_std[j])
    y = np.where(valid, scaled, 0.0)
    return np.stack(planes), y, (valid & hidden).astype(float)


def test_windows_across_chunk_borders_equal_a_numpy_slice(task, tiny):
    values = {v: tiny[v].values for v in (*task.spec.inputs, task.spec.target)}
    stream = PatchStream(task, "train", batch_size=7, shuffle=False)
    order = np.concatenate([stream.origins[u.windows] for u in stream.epoch_units(0)])
    batches = list(stream.batches(0))
    x, y, mask = (np.concatenate(a) for a in zip(*batches))
    assert len(x) == len(order) == task.samples["train"]
    crossing = 0
    for i, origin in enumerate(order):
        rx, ry, rmask = reference_window(task, values, origin)
        np.testing.assert_allclose(x[i], rx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y[i], ry, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(mask[i], rmask)
        chunks = [
            (np.searchsorted(e, o, "right"), np.searchsorted(e, o + n - 1, "right"))
            for e, o, n in zip(stream.chunk_edges, origin, task.spec.patch.size)
        ]
        crossing += any(a != b for a, b in chunks)
    assert crossing > len(order) // 4  # most of tiny's windows cross a chunk border
    assert mask.sum() == task.windows.targets["train"]


def window_keys(stream, epoch: int) -> Counter:
    """Each delivered window as the bytes of its (x, y, mask): a multiset to compare."""
    return Counter(
        b"".join(a.tobytes() for a in window)
        for batch in stream.batches(epoch)
        for window in zip(*batch)
    )


class CountingReader:
    """A reader that counts how often each chunk of each variable is read."""

    def __init__(self, inner, edges):
        self.inner, self.edges, self.name = inner, edges, "counting"
        self.reads: Counter = Counter()

    def _chunk(self, window):
        return tuple(
            int(np.searchsorted(e, s.start, "right") - 1) for e, s in zip(self.edges, window)
        )

    def read(self, var, window):
        self.reads[(var, self._chunk(window))] += 1
        return self.inner.read(var, window)

    def read_many(self, names, window):
        return [self.read(v, window) for v in names]

    def stored_nbytes(self, var, chunk):
        return self.inner.stored_nbytes(var, chunk)


def chunk_edges(task) -> list[np.ndarray]:
    return [np.concatenate([[0], np.cumsum(c)]) for c in task.cube[task.spec.target].chunks]


def chunk_size(task, chunk) -> int:
    return int(np.prod([e[i + 1] - e[i] for e, i in zip(chunk_edges(task), chunk)]))


def covered_chunks(task, part: str) -> set[tuple[int, int, int]]:
    """The chunks the part's windows cover (a window's pixels against the chunk edges)."""
    out = set()
    for origin in task.windows.origins[part]:
        ranges = [
            range(
                int(np.searchsorted(e, o, "right") - 1), int(np.searchsorted(e, o + n - 1, "right"))
            )
            for e, o, n in zip(chunk_edges(task), origin, task.spec.patch.size)
        ]
        out.update(itertools.product(*ranges))
    return out


def block_codes(task, chunk) -> set[int]:
    """The parts (`part_of_block`) of the blocks a chunk's pixels lie in."""
    window = [slice(int(e[i]), int(e[i + 1])) for e, i in zip(chunk_edges(task), chunk)]
    runs = [np.unique(task.grid.index(a)[w]) for a, w in enumerate(window)]
    return {int(c) for c in np.unique(task.part_of_block[np.ix_(*runs)])}


def needed_cells(task, part: str, chunks) -> float:
    """What the part needs of `chunks`, on numpy masks: of each, its cells in the part's
    selection times the part's share of its cells in any part's blocks and selection (a chunk
    of the part's blocks whole, a shared chunk in proportion; a chunk of no part's: none)."""
    runs = [np.repeat(np.arange(len(e) - 1), np.diff(e)) for e in task.grid.edges]

    def selected(p):
        sel = task.selections[p]
        return sel.time[:, None, None] & sel.lat[None, :, None] & sel.lon[None, None, :]

    cells = {
        p: (task.part_of_block == c)[np.ix_(*runs)] & selected(p)
        for c, p in enumerate(task.spec.parts)
    }
    mine, edges = selected(part), chunk_edges(task)
    needed = 0.0
    for chunk in chunks:
        window = tuple(slice(int(e[i]), int(e[i + 1])) for e, i in zip(edges, chunk))
        everyone = sum(int(c[window].sum()) for c in cells.values())
        if everyone:
            needed += int(mine[window].sum()) * int(cells[part][window].sum()) / everyone
    return needed


def amplification(decoded: int, needed: float, roundings: int = 1):
    """decoded / needed cells, for `==`: the loader rounds the bytes a part needs (8 a cell:
    float32 input and target) to whole bytes, once per stream and epoch."""
    return pytest.approx(decoded / needed, rel=roundings / (needed * 4 * 2))


@pytest.mark.parametrize("buffer_chunks", [1, 8])
def test_each_chunk_is_decoded_once_per_epoch_and_each_window_delivered_once(
    task, tiny, buffer_chunks
):
    """Each chunk the train windows cover is read once an epoch, no other; on the physical
    grid the chunks are shared with val and test, so train needs only its share of them."""
    edges = [np.concatenate([[0], np.cumsum(c)]) for c in tiny[task.spec.target].chunks]
    reader = CountingReader(open_reader(task.cube), edges)
    stream = PatchStream(task, "train", 16, reader=reader, buffer_chunks=buffer_chunks)
    plain = PatchStream(task, "train", 16, shuffle=False)
    reference = window_keys(plain, 0)
    for epoch in range(2):
        assert window_keys(stream, epoch) == reference  # every window once, whatever the order
    chunks = covered_chunks(task, "train")
    assert stream.chunks == sorted(chunks)
    variables = (*task.spec.inputs, task.spec.target)
    assert set(reader.reads) == {(v, c) for v in variables for c in chunks}
    assert set(reader.reads.values()) == {2}  # two epochs: each chunk twice, never more
    stats = stream.stats
    assert stats.chunks_decoded == 2 * len(chunks)
    decoded = sum(chunk_size(task, c) for c in chunks)
    needed = needed_cells(task, "train", chunks)
    assert stats.bytes_decoded == 2 * decoded * 4 * 2
    assert stats.bytes_needed == pytest.approx(2 * needed * 4 * 2, abs=2)
    assert stats.read_amplification == amplification(decoded, needed, roundings=2)
    assert stats.read_amplification > 1
    assert stats.samples == 2 * task.samples["train"]


def test_on_a_chunks_split_each_chunk_is_decoded_once_per_epoch_across_parts(aligned, task):
    """Blocks of whole chunks: the windows of a part cover only chunks of its blocks, so one
    epoch of every part reads each chunk once at most, and every decoded byte is needed. On
    the physical grid (blocks of 64 pixels) the parts read some chunks each."""
    reader = CountingReader(open_reader(aligned.cube), chunk_edges(aligned))
    for part in aligned.spec.parts:
        stream = PatchStream(aligned, part, 16, reader=reader)
        for _ in stream.batches(0):
            pass
        assert set(stream.chunks) == covered_chunks(aligned, part)
        for chunk in stream.chunks:  # in the part's blocks, or in blocks of no part
            assert block_codes(aligned, chunk) <= {aligned.spec.parts.index(part), -1}
        assert stream.stats.bytes_needed == stream.stats.bytes_decoded > 0
        assert stream.stats.read_amplification == 1.0
    assert set(reader.reads.values()) == {1}
    readers = Counter(c for p in task.spec.parts for c in covered_chunks(task, p))
    assert max(readers.values()) > 1


def test_shuffled_epochs_differ_and_repeat_with_the_seed(task):
    def first_batch(seed, epoch):
        return next(iter(PatchStream(task, "train", 16, seed=seed).batches(epoch)))[0]

    assert np.array_equal(first_batch(1, 0), first_batch(1, 0))
    assert not np.array_equal(first_batch(1, 0), first_batch(1, 1))


def test_shards_cover_every_window_once(task):
    whole = window_keys(PatchStream(task, "train", 16, shuffle=False), 0)
    shards = [PatchStream(task, "train", 16).shard(i, 3) for i in range(3)]
    assert sum((window_keys(s, 0) for s in shards), Counter()) == whole
    # contiguous stretches of the walk: each shard decodes the chunks its windows need once,
    # and only chunks at the 2 cuts are decoded by two shards
    needs = [{c for u in s.epoch_units(0) for c in u.needs} for s in shards]
    assert [s.stats.chunks_decoded for s in shards] == [len(n) for n in needs]
    assert set().union(*needs) == set(shards[0].chunks)
    assert sum(map(len, needs)) <= len(shards[0].chunks) * 1.5


@pytest.fixture(scope="module")
def deep(tiny):
    """Windows 3 steps deep every step (overlapping), crossing time chunks too: blocks of
    2 x 2 x 2 chunks (`chunks:2,2,2`), a single strip."""
    spec = replace(get_task("lst-gapfill"), patch=Patch((3, 8, 8), (1, 4, 4)), split="chunks:2,2,2")
    return prepare_task(spec, tiny)


def test_deep_windows_cross_time_chunks_and_each_chunk_is_decoded_once(deep, tiny):
    stream = PatchStream(deep, "train", 16)
    assert len(stream.strips) == 1  # every axis is crossed
    values = {v: tiny[v].values for v in (*deep.spec.inputs, deep.spec.target)}
    plain = PatchStream(deep, "train", 16, shuffle=False)
    order = np.concatenate([plain.origins[u.windows] for u in plain.epoch_units(0)])
    x, y, mask = (np.concatenate(a) for a in zip(*plain.batches(0)))
    for i in range(0, len(order), 7):  # a sample of the windows against the definition
        rx, ry, rmask = reference_window(deep, values, order[i])
        np.testing.assert_allclose(x[i], rx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y[i], ry, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(mask[i], rmask)
    time_edges = np.cumsum(tiny[deep.spec.target].chunks[0])[:-1]
    assert any(((order[:, 0] < e) & (order[:, 0] + 3 > e)).any() for e in time_edges)
    reference = window_keys(plain, 0)
    for epoch in range(2):
        assert window_keys(stream, epoch) == reference
    assert stream.stats.chunks_decoded == 2 * len(stream.chunks)
    # the walk's direction changes with the epoch: another order, the same windows
    first = [u.chunk for u in stream.epoch_units(0)]
    assert any([u.chunk for u in stream.epoch_units(e)] != first for e in range(1, 6))


@pytest.mark.parametrize("count", [2, 5])
def test_shards_of_a_single_strip_take_stretches_of_it(deep, count):
    whole = window_keys(PatchStream(deep, "train", 16, shuffle=False), 0)
    shards = [PatchStream(deep, "train", 16).shard(i, count) for i in range(count)]
    assert sum((window_keys(s, 0) for s in shards), Counter()) == whole
    decoded = sum(s.stats.chunks_decoded for s in shards)
    # only the chunks where one stretch ends and the next begins are decoded twice
    assert decoded <= len(shards[0].chunks) * (1 + 0.5 * (count - 1))


def test_a_region_task_fills_only_pixels_inside_the_region(tiny):
    from cubebench.task import Box

    spec = replace(get_task("lst-gapfill"), region=Box(-40.0, 80.0, -120.0, 160.0))
    task = prepare_task(spec, tiny)
    stream = PatchStream(task, "train", 16, shuffle=False)
    order = np.concatenate([stream.origins[u.windows] for u in stream.epoch_units(0)])
    _, _, mask = (np.concatenate(a) for a in zip(*stream.batches(0)))
    lat, lon = task.coords.lat, task.coords.lon
    for origin, m in zip(order, mask):
        _, iy, ix = np.nonzero(m)
        assert ((lat[origin[1] + iy] >= -40) & (lat[origin[1] + iy] <= 80)).all()
        assert ((lon[origin[2] + ix] >= -120) & (lon[origin[2] + ix] <= 160)).all()
    assert mask.sum() == task.windows.targets["train"] > 0


def new_loader_threads(before: set[threading.Thread]) -> list[str]:
    """Loader threads started since `before` and still alive (streams of other tests that
    were left unfinished keep theirs until they are collected)."""
    return [
        t.name for t in threading.enumerate() if t not in before and t.name.startswith("cubebench-")
    ]


def test_a_stream_stopped_early_stops_its_threads(task):
    before = set(threading.enumerate())
    stream = PatchStream(task, "train", 4, threads=2)
    batches = stream.batches(0)
    next(batches)
    assert new_loader_threads(before)  # the test sees them while they run
    batches.close()
    assert stream.stats.samples == 4
    assert not new_loader_threads(before)


def test_a_decode_that_fails_reaches_the_consumer_and_stops_the_threads(task):
    before = set(threading.enumerate())
    stream = PatchStream(task, "train", 4, threads=2)
    calls = []

    def failing(chunk):
        calls.append(chunk)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return PatchStream.decode_planes(stream, chunk)

    stream.decode_planes = failing
    with pytest.raises(RuntimeError, match="boom"):
        for _ in stream.batches(0):
            pass
    assert not new_loader_threads(before)


def test_window_placement_matches_a_brute_force_count():
    """Random grids, blocks, parts and strides: every window kept, dropped or left out as a
    window-by-window check decides."""
    rng = np.random.default_rng(0)
    parts = ("a", "b", "c")
    for _ in range(60):
        shape = tuple(int(v) for v in rng.integers(3, 16, 3))
        size = tuple(int(rng.integers(1, n + 1)) for n in shape)
        step = tuple(int(rng.choice([d for d in range(1, s + 1) if s % d == 0])) for s in size)
        patch = Patch(size, step, 0.3, 2)
        edges = [np.array([0, *sorted(set(rng.integers(1, n, 3).tolist())), n]) for n in shape]
        part_of_block = rng.integers(-1, 3, tuple(len(e) - 1 for e in edges))
        targets = rng.random(shape) < 0.3
        cells = np.zeros(n_cells(shape, step), np.int64)
        for block in np.ndindex(*part_of_block.shape):
            sl = tuple(slice(int(e[i]), int(e[i + 1])) for e, i in zip(edges, block))
            first, counts = cell_counts(targets[sl], [s.start for s in sl], step)
            cells[tuple(slice(f, f + n) for f, n in zip(first, counts.shape))] += counts
        got = place_windows(patch, shape, edges, part_of_block, parts, cells)

        kept = {p: [] for p in parts}
        pixels = dict.fromkeys(parts, 0)
        dropped = without = 0
        per_axis = [(n - s) // k + 1 for n, s, k in zip(shape, size, step)]
        for index in np.ndindex(*per_axis):
            origin = tuple(i * k for i, k in zip(index, step))
            window = tuple(slice(o, o + n) for o, n in zip(origin, size))
            count = int(targets[window].sum())
            blocks_per_axis = [
                {int(np.searchsorted(e, x, "right") - 1) for x in range(w.start, w.stop)}
                for e, w in zip(edges, window)
            ]
            touched = {int(part_of_block[b]) for b in itertools.product(*blocks_per_axis)}
            touched.discard(-1)
            if len(touched) > 1:
                dropped += count > 0
            elif touched and not count:
                without += 1
            elif touched:
                part = parts[touched.pop()]
                kept[part].append(origin)
                pixels[part] += count
        for part in parts:
            assert sorted(map(tuple, got.origins[part].tolist())) == sorted(kept[part])
            assert got.targets[part] == pixels[part]
        assert (got.dropped_across_parts, got.without_targets) == (dropped, without)


def test_gaps_do_not_depend_on_how_the_grid_is_cut():
    patch = Patch(gap_fraction=0.3, gap_size=3)
    whole = hidden_mask(patch, 7, slice(0, 10), slice(0, 30), slice(0, 40))
    pieces = np.concatenate(
        [
            hidden_mask(patch, 7, slice(0, 10), slice(y, y + 7), slice(0, 40))
            for y in range(0, 30, 7)
        ],
        axis=1,
    )[:, :30]
    np.testing.assert_array_equal(whole, pieces)
    assert abs(whole.mean() - 0.3) < 0.05
    # squares of 3 x 3 pixels are hidden together
    assert (whole[:, :3, :3] == whole[:, :1, :1]).all()
    assert not np.array_equal(whole, hidden_mask(patch, 8, *(slice(0, n) for n in (10, 30, 40))))


@pytest.mark.parametrize("which", ["task", "deep"])
def test_window_shape_is_the_shape_the_stream_delivers(which, request):
    """The models are built from `window_shape` before any stream exists: it must agree
    with the batches, 1 and 3 time steps deep."""
    from cubebench.models import window_shape

    prepared = request.getfixturevalue(which)
    x, y, _ = next(iter(PatchStream(prepared, "val", 4, shuffle=False)))
    channels, (t, h, w) = window_shape(prepared)
    assert x.shape[1:] == (channels, h, w) and y.shape[1:] == (t, h, w)
    pixels = prepare_task(get_task("lst-from-t2m"), request.getfixturevalue("tiny"))
    with pytest.raises(ValueError, match="samples pixels"):
        window_shape(pixels)


def test_open_stream_follows_the_geometry(tiny, task):
    assert isinstance(open_stream(task, "val"), PatchStream)
    pixels = prepare_task(get_task("lst-from-t2m"), tiny)
    assert not isinstance(open_stream(pixels, "val"), PatchStream)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (dict(size=(1, 16, 16), stride=(1, 5, 5)), "must divide"),
        (dict(size=(1, 0, 16)), "positive integers"),
        (dict(gap_fraction=1.5), "gap_fraction"),
        (dict(gap_size=0), "gap_size"),
    ],
)
def test_bad_patches_are_refused(patch, message):
    with pytest.raises(TaskError, match=message):
        Patch(**patch)


def test_a_window_larger_than_the_cube_or_a_region_split_is_refused(tiny):
    with pytest.raises(TaskError, match="larger than the cube"):
        prepare_task(replace(get_task("lst-gapfill"), patch=Patch((1, 64, 64))), tiny)
    with pytest.raises(TaskError, match=r"the patch geometry has no region \(transfer\) split"):
        replace(get_task("lst-from-t2m-transfer"), patch=Patch())
    # windows go on any other grid: physical blocks, time periods, whole chunks
    for split in ("blocks:46d,64px", "time", "chunks:1,2,2"):
        assert replace(get_task("lst-gapfill"), split=split).split == Split.parse(split)


@pytest.mark.parametrize(
    ("task_name", "split"),
    [("lst-gapfill", None), pytest.param("lst-from-t2m", "chunks", marks=pytest.mark.slow)],
)
def test_bench_loader_measures_windows(tiny, task_name, split):
    """8 x 8 windows of the train part: on the gap-filling task's blocks of 64 pixels the
    chunks are shared between the parts (train needs its share of them); on the pixel task's
    `chunks` split the blocks are whole chunks (12 x 12 x 23) and every decoded byte is
    needed."""
    command = ["bench-loader", "--cube", "synthetic:tiny", "--task", task_name]
    command += ["--geometry", "patch", "--patch", "1,8,8", "--epochs", "1", "--max-seconds", "0"]
    command += ["--json"]
    command += ["--split", split] if split else []
    out = subprocess.run(
        [sys.executable, "-m", "cubebench", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["geometry"] == "patch" and row["patch"] == [1, 8, 8]
    spec = replace(get_task(task_name, split=split), patch=Patch((1, 8, 8)))
    prepared = prepare_task(spec, tiny)
    assert row["windows"] == row["expected_windows"] == prepared.samples["train"] > 0
    chunks = covered_chunks(prepared, "train")
    assert row["chunks_decoded"] == len(chunks)
    if split == "chunks":
        assert row["read_amplification"] == 1.0
    else:
        decoded = sum(chunk_size(prepared, c) for c in chunks)
        needed = needed_cells(prepared, "train", chunks)
        assert row["read_amplification"] == amplification(decoded, needed)
        assert row["read_amplification"] > 1
    assert row["ratio_to_raw"] > 0 and row["windows_per_s"] > 0


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("which", ["task", "deep"])
def test_shards_step_together_and_deliver_every_window_once(which, count, request):
    """Every shard yields ceil(N / (B n)) batches of balanced sizes, every epoch; together
    every window once; each share within one unit's windows of the mean."""
    prepared = request.getfixturevalue(which)
    size, n = 16, prepared.samples["train"]
    steps = -(-n // (size * count))
    whole = window_keys(PatchStream(prepared, "train", size, shuffle=False), 0)
    shards = [PatchStream(prepared, "train", size).shard(i, count) for i in range(count)]
    largest = max(len(u.windows) for u in shards[0].units)
    for epoch in range(3):
        together: Counter = Counter()
        shares = []
        for stream in shards:
            assert stream.steps_per_epoch(epoch) == steps
            sizes = []
            for batch in stream.batches(epoch):
                sizes.append(len(batch[0]))
                together.update(b"".join(a.tobytes() for a in window) for window in zip(*batch))
            share = sum(len(u.windows) for u in stream.epoch_units(epoch))
            assert stream.shard_samples(epoch) == share == sum(sizes)
            assert len(sizes) == steps and max(sizes) - min(sizes) <= 1
            shares.append(share)
        assert together == whole
        assert all(abs(share - n / count) <= largest for share in shares)


def test_a_window_shard_short_of_windows_steps_with_empty_batches(task):
    count = 3
    shards = [PatchStream(task, "val", 1).shard(i, count) for i in range(count)]
    steps = -(-task.samples["val"] // count)
    t, h, w = task.spec.patch.size
    empties = 0
    for stream in shards:
        batches = list(stream.batches(0))
        assert len(batches) == steps == stream.steps_per_epoch()
        for x, y, mask in batches:
            assert x.shape == (len(y), stream.channels, h, w)
            assert y.shape == mask.shape == (len(y), t, h, w)
            assert x.dtype == y.dtype == mask.dtype == np.float32
            empties += not len(y)
    assert empties > 0


@pytest.mark.parametrize("split", ["chunks:1,2,2", None])
def test_read_amplification_of_windows_counts_the_cells_outside_the_region(tiny, split):
    """A region's border inside chunks: the decoded chunks' cells outside the region count
    as read for nothing. On blocks of whole chunks that is the only cost (the part needs its
    chunks' cells in the region); on the physical grid the parts also share chunks. The
    ratio equals a count on numpy masks."""
    from cubebench.task import Box

    spec = replace(get_task("lst-gapfill", split=split), region=Box(-40.0, 80.0, -120.0, 160.0))
    task = prepare_task(spec, tiny)
    stream = PatchStream(task, "train", 16)
    for _ in stream.batches(0):
        pass
    sel = task.selections["train"]
    selected = sel.time[:, None, None] & sel.lat[None, :, None] & sel.lon[None, None, :]
    chunks = covered_chunks(task, "train")  # every chunk the windows need
    assert stream.chunks == sorted(chunks)
    assert stream.stats.chunks_decoded == len(chunks)
    decoded = sum(chunk_size(task, c) for c in chunks)
    needed = needed_cells(task, "train", chunks)
    if split:
        edges = chunk_edges(task)
        windows = [tuple(slice(e[i], e[i + 1]) for e, i in zip(edges, c)) for c in chunks]
        assert needed == sum(int(selected[w].sum()) for w in windows)
    assert decoded / needed > 1
    assert stream.stats.read_amplification == amplification(decoded, needed)
