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
from cubebench.task import get_task, prepare_task
from cubebench.windows import Patch, cell_counts, hidden_mask, n_cells, place_windows


@pytest.fixture(scope="module")
def task(tiny):
    return prepare_task(get_task("lst-gapfill"), tiny)


def test_windows_lie_in_the_blocks_of_one_part(task):
    owner = {tuple(block): part for part, blocks in task.blocks.items() for block in blocks}
    for part, origins in task.windows.origins.items():
        assert len(origins) == task.samples[part] > 0
        for origin in origins:
            ranges = [range(a, b + 1) for a, b in touched_in_order(task, origin)]
            parts = {
                owner.get(tuple(r[i] for r, i in zip(ranges, idx)))
                for idx in np.ndindex(*[len(r) for r in ranges])
            }
            assert parts - {None} == {part}
    # the tiny cube's 12 x 23 chunks are narrower than a window: some windows had to go
    assert task.windows.dropped_across_parts > 0
    every = [tuple(o) for origins in task.windows.origins.values() for o in origins]
    assert len(every) == len(set(every))  # no window in two parts


def touched_in_order(task, origin):
    """(first, last) block index per axis of a window at `origin`."""
    size = task.spec.patch.size
    return [
        (
            int(np.searchsorted(edges, o, "right") - 1),
            int(np.searchsorted(edges, o + n - 1, "right") - 1),
        )
        for edges, o, n in zip(task.block_edges, origin, size)
    ]


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


@pytest.mark.parametrize("buffer_chunks", [1, 8])
def test_each_chunk_is_decoded_once_per_epoch_and_each_window_delivered_once(
    task, tiny, buffer_chunks
):
    edges = [np.concatenate([[0], np.cumsum(c)]) for c in tiny[task.spec.target].chunks]
    reader = CountingReader(open_reader(task.cube), edges)
    stream = PatchStream(task, "train", 16, reader=reader, buffer_chunks=buffer_chunks)
    plain = PatchStream(task, "train", 16, shuffle=False)
    reference = window_keys(plain, 0)
    for epoch in range(2):
        assert window_keys(stream, epoch) == reference  # every window once, whatever the order
    variables = (*task.spec.inputs, task.spec.target)
    assert set(reader.reads) == {(v, c) for v in variables for c in stream.chunks}
    assert set(reader.reads.values()) == {2}  # two epochs: each chunk twice, never more
    stats = stream.stats
    assert stats.chunks_decoded == 2 * len(stream.chunks)
    assert stats.read_amplification == 1.0
    assert stats.samples == 2 * task.samples["train"]


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
    2 x 2 x 2 chunks, a single strip."""
    spec = replace(
        get_task("lst-gapfill"), patch=Patch((3, 8, 8), (1, 4, 4)), block_chunks=(2, 2, 2)
    )
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
    with pytest.raises(TaskError, match="blocks"):
        replace(get_task("lst-from-t2m-transfer"), patch=Patch())


def test_bench_loader_measures_windows(tiny):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cubebench",
            "bench-loader",
            "--cube",
            "synthetic:tiny",
            "--geometry",
            "patch",
            "--patch",
            "1,8,8",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["geometry"] == "patch" and row["patch"] == [1, 8, 8]
    assert row["windows"] == row["expected_windows"] > 0
    assert row["read_amplification"] == 1.0
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


def test_read_amplification_of_windows_counts_the_cells_outside_the_region(tiny):
    """A region's border inside chunks: the decoded chunks' cells outside the region count
    as read for nothing. The ratio equals a count on numpy masks."""
    from cubebench.task import Box

    spec = replace(get_task("lst-gapfill"), region=Box(-40.0, 80.0, -120.0, 160.0))
    task = prepare_task(spec, tiny)
    stream = PatchStream(task, "train", 16)
    for _ in stream.batches(0):
        pass
    sel = task.selections["train"]
    selected = sel.time[:, None, None] & sel.lat[None, :, None] & sel.lon[None, None, :]
    decoded = needed = 0
    for chunk in stream.chunks:  # every chunk the windows need
        window = stream.chunk_slices(chunk)
        decoded += selected[window].size
        needed += int(selected[window].sum())
    assert stream.stats.chunks_decoded == len(stream.chunks)
    assert stream.stats.read_amplification == decoded / needed > 1
