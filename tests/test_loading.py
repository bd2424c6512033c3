"""The streaming loader: exactly once, no leakage, determinism, adapters, cost counters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from cubebench.loading import ChunkStream, available_readers, materialize
from cubebench.task import PARTS, get_task, prepare_task

TARGET = "land_surface_temperature"


@pytest.fixture(scope="module")
def chunks_task(tiny):
    """The pixel task on a `chunks` split: every block one storage chunk (12 x 12 x 23)."""
    return prepare_task(get_task("lst-from-t2m", split="chunks"), tiny)


# --- the split and the chunks on numpy masks: what a part reads and needs --------------------


def _chunk_windows(task) -> dict[tuple[int, int, int], tuple[slice, slice, slice]]:
    """Every storage chunk of the cube (from the target's dask chunks): index -> slices."""
    edges = [np.concatenate([[0], np.cumsum(c)]) for c in task.cube[TARGET].chunks]
    return {
        chunk: tuple(slice(int(e[i]), int(e[i + 1])) for e, i in zip(edges, chunk))
        for chunk in np.ndindex(*(len(e) - 1 for e in edges))
    }


def _selected(task, part: str) -> np.ndarray:
    """The part's selection (box, time range) as a boolean cube."""
    sel = task.selections[part]
    return sel.time[:, None, None] & sel.lat[None, :, None] & sel.lon[None, None, :]


def _cells_of(task, part: str) -> np.ndarray:
    """The part's cells as a boolean cube: its blocks (`part_of_block` spread over the grid's
    runs, `grid.edges`) inside its selection; valid or not."""
    code = task.spec.parts.index(part)
    runs = [np.repeat(np.arange(len(e) - 1), np.diff(e)) for e in task.grid.edges]
    return (task.part_of_block == code)[np.ix_(*runs)] & _selected(task, part)


def _valid(task) -> np.ndarray:
    """Pixels whose input and target are both finite."""
    cube = task.cube
    return np.isfinite(cube["air_temperature_2m"].values) & np.isfinite(cube[TARGET].values)


def _costs(task, part: str) -> tuple[list[tuple[int, int, int]], int, float]:
    """(the chunks the part reads, in C order; their cells; the cells the part needs of them).

    A part reads every chunk holding one of its cells, whole. It needs of a chunk the chunk's
    cells in its selection times its share of the chunk's cells that lie in any part (its
    cells over all parts' cells there): a chunk of the part's blocks whole, a chunk the parts
    share in proportion."""
    cells = {p: _cells_of(task, p) for p in task.spec.parts}
    selected = _selected(task, part)
    chunks, decoded, needed = [], 0, 0.0
    for chunk, window in _chunk_windows(task).items():
        mine = int(cells[part][window].sum())
        if mine:
            chunks.append(chunk)
            decoded += selected[window].size
            everyone = sum(int(c[window].sum()) for c in cells.values())
            needed += int(selected[window].sum()) * mine / everyone
    return chunks, decoded, needed


def _amplification(decoded: int, needed: float, roundings: int = 1):
    """decoded / needed cells, for `==`: the loader rounds what a part needs to whole bytes
    (8 a cell: float32 input and target), once per stream and epoch."""
    return pytest.approx(decoded / needed, rel=roundings / (needed * 4 * 2))


def _rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Samples as sorted rows (features..., target): a multiset to compare."""
    rows = np.column_stack([x, y]).astype(np.float64)
    return rows[np.lexsort(rows.T[::-1])]


def _reference(task, part: str) -> np.ndarray:
    x, y = task.load_part(part)
    xn, yn = task.normalize(x, y)
    return _rows(xn, yn)


def _collect(batches) -> tuple[np.ndarray, np.ndarray, list[int]]:
    xs, ys, sizes = [], [], []
    for x, y in batches:
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == np.float32 and y.dtype == np.float32
        assert x.flags["C_CONTIGUOUS"] and x.shape == (len(y), 4)
        xs.append(x)
        ys.append(y)
        sizes.append(len(y))
    return np.concatenate(xs), np.concatenate(ys), sizes


@pytest.mark.parametrize("reader", ["direct", "tensorstore", "zarr", "xarray"])
@pytest.mark.parametrize("part", PARTS)
def test_every_valid_sample_exactly_once(tiny_task, part, reader):
    stream = ChunkStream(tiny_task, part, batch_size=1000, reader=reader, buffer_chunks=3)
    x, y, sizes = _collect(stream.batches(epoch=0))
    assert len(y) == tiny_task.samples[part]
    np.testing.assert_allclose(_rows(x, y), _reference(tiny_task, part), rtol=0, atol=2e-5)
    # all batches full but the last, which is kept
    assert all(s == 1000 for s in sizes[:-1]) and 0 < sizes[-1] <= 1000


def test_readers_are_offered_fastest_first(tiny_task):
    assert available_readers(tiny_task.cube)[:2] == ["direct", "tensorstore"]
    assert available_readers(tiny_task.cube)[-1] == "xarray"


@pytest.mark.parametrize("fmt", [2, 3])
@pytest.mark.parametrize("layout", ["balanced", pytest.param("5,7,11", marks=pytest.mark.slow)])
def test_direct_reader_equals_zarr_on_any_window(tmp_path, fmt, layout):
    """Whole chunks, edge chunks (stored whole, cut to the array) and windows across chunks
    give zarr-python's values; an unwritten chunk gives the fill value."""
    import zarr

    from cubebench.cube import make_cube, open_cube
    from cubebench.loading.readers import open_reader

    path = make_cube("tiny", layout=layout, zarr_format=fmt, output=tmp_path / "c.zarr")
    cube = open_cube(str(path))
    direct, reference = open_reader(cube, "direct"), open_reader(cube, "zarr")
    var = "land_surface_temperature"
    chunks = zarr.open_array(str(path), path=var, mode="r").chunks
    shape = cube[var].shape
    windows = [
        tuple(slice(0, c) for c in chunks),
        tuple(slice((n - 1) // c * c, n) for n, c in zip(shape, chunks)),  # the edge chunk
        (slice(1, shape[0] - 1), slice(3, shape[1] // 2 + 5), slice(0, shape[2])),
    ]
    for window in windows:
        np.testing.assert_array_equal(direct.read(var, window), reference.read(var, window))
    key = "/".join(["c", "0", "0", "0"]) if fmt == 3 else "0.0.0"
    (path / var / key).unlink()
    fresh = open_reader(open_cube(str(path)), "direct")
    assert np.isnan(fresh.read(var, windows[0])).all()


def test_drop_last_drops_only_the_partial_batch(tiny_task):
    stream = ChunkStream(tiny_task, "train", batch_size=1000, drop_last=True)
    _, y, sizes = _collect(stream.batches(0))
    assert set(sizes) == {1000}
    assert len(y) == tiny_task.samples["train"] // 1000 * 1000


def test_no_chunk_is_shared_between_parts(chunks_task):
    """A `chunks` split: its blocks are whole chunks, so no chunk holds cells of two parts and
    one epoch of every part decodes each chunk once."""
    streams = {p: ChunkStream(chunks_task, p) for p in PARTS}
    chunks = {p: set(s.chunks) for p, s in streams.items()}
    assert all(chunks.values())
    assert not chunks["train"] & chunks["val"]
    assert not chunks["train"] & chunks["test"]
    assert not chunks["val"] & chunks["test"]
    for stream in streams.values():
        for _ in stream.batches(0):
            pass
    decoded = sum(s.stats.chunks_decoded for s in streams.values())
    assert decoded == len(set().union(*chunks.values()))


def test_a_chunk_of_several_parts_is_read_by_each_and_masked_to_it(tiny_task):
    """The physical split (blocks of 46 days x 10 degrees) does not follow tiny's chunks of
    12 steps x 12 x 23 pixels: a chunk holds cells of several parts. Each part's stream reads
    exactly the chunks holding its cells, and from each delivers only its own valid pixels."""
    valid = _valid(tiny_task)
    windows = _chunk_windows(tiny_task)
    readers = Counter()
    for part in PARTS:
        mine = valid & _cells_of(tiny_task, part)
        stream = ChunkStream(tiny_task, part, shuffle=False)
        expected, _, _ = _costs(tiny_task, part)
        assert stream.chunks == tiny_task.part_chunks(part) == expected
        for chunk in stream.chunks:
            count = int(mine[windows[chunk]].sum())
            assert len(stream.decode(chunk).y) == tiny_task.chunk_samples[part][chunk] == count
        readers.update(stream.chunks)
    assert max(readers.values()) > 1  # some chunk is read by two or three parts


def test_same_seed_same_batches_other_epoch_other_order(tiny_task):
    def epoch(e, seed=None):
        stream = ChunkStream(tiny_task, "train", batch_size=512, seed=seed)
        return [y.copy() for _, y in stream.batches(e)]

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    np.testing.assert_array_equal(np.sort(np.concatenate(a)), np.sort(np.concatenate(c)))
    assert not np.array_equal(np.concatenate(a), np.concatenate(epoch(0, seed=99)))


def test_batches_mix_chunks(tiny_task):
    """A shuffled batch draws from several chunks, not from one chunk at a time."""
    stream = ChunkStream(tiny_task, "train", batch_size=256, buffer_chunks=6)
    x, _ = next(iter(stream.batches(0)))
    # time of year (sin, cos) and latitude identify a chunk's time and latitude range
    assert len(np.unique(np.round(x[:, 1:], 4), axis=0)) > 20
    in_order = ChunkStream(tiny_task, "train", batch_size=256, shuffle=False)
    x_in_order, _ = next(iter(in_order.batches(0)))
    assert len(np.unique(np.round(x_in_order[:, 2:], 4), axis=0)) <= 12  # one chunk: 12 steps


@pytest.mark.parametrize("split", ["blocks", "chunks"])
def test_counters_are_consistent(split, request):
    """The counters against numpy masks: the test part reads the chunks holding its cells,
    decodes them whole (float32 input and target) and needs its share of them; on a `chunks`
    split that is all of them (1.0), on the physical grid it shares them with train and val."""
    task = request.getfixturevalue("tiny_task" if split == "blocks" else "chunks_task")
    stream = ChunkStream(task, "test", batch_size=700)
    for _ in stream.batches(0):
        pass
    stats = stream.stats
    chunks, decoded, needed = _costs(task, "test")
    assert stream.chunks == chunks
    assert stats.chunks_decoded == len(chunks)
    assert stats.bytes_decoded == decoded * 4 * 2  # input and target
    assert stats.bytes_needed == pytest.approx(needed * 4 * 2, abs=1)
    assert stats.read_amplification == _amplification(decoded, needed)
    if split == "chunks":
        assert stats.bytes_needed == stats.bytes_decoded and stats.read_amplification == 1.0
    else:  # the test part holds about a sixth of the cells of the chunks it reads
        assert stats.read_amplification > 2
    assert (
        stats.samples == task.samples["test"] == int((_valid(task) & _cells_of(task, "test")).sum())
    )
    assert stats.batches == -(-stats.samples // 700)
    assert 0 < stats.bytes_read < stats.bytes_decoded  # compressed bytes from the store
    assert 0 <= stats.stall_seconds <= stats.wall_seconds
    assert stats.time_to_first_batch_s is not None


def test_materialize_is_a_seeded_subsample(tiny_task):
    x, y = materialize(tiny_task, "train", max_samples=5000)
    assert x.shape == (5000, 4) and len(y) == 5000
    x2, y2 = materialize(tiny_task, "train", max_samples=5000)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(x, x2)
    full = _reference(tiny_task, "train")
    picked = _rows(x, y)
    # every picked row is a real sample of the part (searchsorted on the sorted targets)
    targets = np.sort(full[:, -1])
    pos = np.clip(np.searchsorted(targets, picked[:, -1]), 0, len(targets) - 1)
    assert np.abs(targets[pos] - picked[:, -1]).max() < 1e-5
    xa, _ = materialize(tiny_task, "train")
    assert len(xa) == tiny_task.samples["train"]


# a spawned DataLoader worker costs seconds to start: one and two of them in the full tier
@pytest.mark.parametrize("workers", [0, *(pytest.param(n, marks=pytest.mark.slow) for n in (1, 2))])
def test_torch_workers_deliver_every_sample_once(tiny_task, workers):
    from cubebench.loading.torch import loader

    stream = ChunkStream(tiny_task, "val", batch_size=500)
    x, y, _ = _collect(loader(stream, num_workers=workers))
    assert len(y) == tiny_task.samples["val"]
    np.testing.assert_allclose(_rows(x, y), _reference(tiny_task, "val"), rtol=0, atol=2e-5)


def test_tf_batches_equal_numpy_batches_and_each_pass_is_the_next_epoch(tiny_task):
    from cubebench.loading.tf import dataset

    stream = ChunkStream(tiny_task, "train", batch_size=999)
    batches = dataset(ChunkStream(tiny_task, "train", batch_size=999), epoch=3)
    for epoch in (3, 4):  # as Keras' fit(epochs=N) iterates one dataset N times
        numpy_batches = list(stream.batches(epoch))
        tf_batches = list(batches)
        assert len(tf_batches) == len(numpy_batches)
        for (xt, yt), (xn, yn) in zip(tf_batches, numpy_batches):
            np.testing.assert_array_equal(xt.numpy(), xn)
            np.testing.assert_array_equal(yt.numpy(), yn)


def test_mix_interleaves_parts_in_proportion():
    from cubebench.loading.stream import mix

    sizes = [1000, 3000, 500, 0]
    parts = [
        (np.full((n, 2), k, np.float32), np.arange(n, dtype=np.float32))
        for k, n in enumerate(sizes)
    ]
    x, y = mix(parts, stretch=128)
    owner = x[:, 0].astype(int)
    assert len(y) == sum(sizes)
    for k, n in enumerate(sizes):  # every sample once, each part in its own order
        np.testing.assert_array_equal(y[owner == k], np.arange(n))
    for start in range(0, len(y) - 512, 512):  # any stretch draws in proportion to size
        counts = np.bincount(owner[start : start + 512], minlength=len(sizes))
        expected = 512 * np.array(sizes) / sum(sizes)
        assert np.all(np.abs(counts - expected) <= 0.25 * expected + 16), counts


@pytest.mark.parametrize(
    ("adapter", "split"),
    [
        ("numpy", None),
        pytest.param("torch", None, marks=pytest.mark.slow),
        pytest.param("tf", None, marks=pytest.mark.slow),
        pytest.param("numpy", "chunks", marks=pytest.mark.slow),
    ],
    ids=["numpy", "torch", "tf", "numpy-chunks"],
)
def test_bench_loader_cli_reports_costs(adapter, split, request):
    """The train part's costs; the read amplification on numpy masks: whole chunks of the
    train blocks (`--split chunks`) are needed whole, 1.0; the task's physical grid shares
    tiny's chunks between the parts, so train needs only its share of them."""
    task = request.getfixturevalue("chunks_task" if split else "tiny_task")
    command = ["bench-loader", "--cube", "synthetic:tiny", "--adapter", adapter, "--json"]
    command += ["--epochs", "2", "--max-seconds", "0"]  # exactly two measured pairs
    command += ["--split", split] if split else []
    proc = subprocess.run(
        [sys.executable, "-m", "cubebench", *command],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["epochs"] == 2
    assert row["pairs"] == row["expected_pairs"] == 2 * task.samples["train"]
    for key in ("pairs_per_s", "raw_decode_pairs_per_s", "raw_extract_pairs_per_s", "peak_rss_mb"):
        assert row[key] > 0
    low, high = row["ratio_to_raw_ci95"]
    assert 0 < low <= row["ratio_to_raw"] <= high
    assert row["raw_reader"] in row["raw_by_reader"]
    chunks, decoded, needed = _costs(task, "train")
    assert row["chunks_decoded"] == 2 * len(chunks)  # the measured epochs only
    if split == "chunks":
        assert decoded == needed and row["read_amplification"] == 1.0
    else:
        assert decoded / needed > 1
        assert row["read_amplification"] == _amplification(decoded, needed)
    assert row["time_to_first_batch_s"] > 0
    if adapter == "tf":  # consumed inside the graph: no consumer-side stall to observe
        assert row["stall_fraction"] is None
    else:
        assert 0 <= row["stall_fraction"] <= 1


def _void_rows(rows: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in np.ascontiguousarray(rows)]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("count", [2, 3])
def test_shards_take_the_same_steps_and_every_sample_once(tiny_task, count, drop_last):
    """Every shard yields ceil(N / (B n)) batches (floor with drop_last) of balanced sizes,
    every epoch; together they yield the unsharded stream's samples exactly once, dealt by
    chunks in shares that differ by at most one chunk's samples."""
    part, size = "train", 700
    n = tiny_task.samples[part]
    steps = n // (size * count) if drop_last else -(-n // (size * count))
    x, y, _ = _collect(ChunkStream(tiny_task, part, batch_size=size).batches(0))
    whole = _rows(x, y)
    shards = [
        ChunkStream(tiny_task, part, batch_size=size, drop_last=drop_last).shard(i, count)
        for i in range(count)
    ]
    largest = max(tiny_task.chunk_samples[part].values())
    for epoch in range(3):
        rows, shares, chunks = [], [], []
        for stream in shards:
            assert stream.steps_per_epoch(epoch) == steps
            x, y, sizes = _collect(stream.batches(epoch))
            share = sum(tiny_task.chunk_samples[part][c] for c in stream.epoch_chunks(epoch))
            assert stream.shard_samples(epoch) == share
            assert len(sizes) == steps and max(sizes) - min(sizes) <= 1
            assert sum(sizes) == (min(share, steps * size) if drop_last else share)
            if drop_last:
                assert max(sizes) <= size
            rows.append(_rows(x, y))
            shares.append(share)
            chunks += stream.epoch_chunks(epoch)
        assert sorted(chunks) == sorted(shards[0].chunks)  # each chunk to one shard
        assert sum(shares) == n and max(shares) - min(shares) <= largest
        together = np.concatenate(rows)
        together = together[np.lexsort(together.T[::-1])]
        if drop_last:  # a part of the samples, none twice
            delivered = Counter(_void_rows(together))
            available = Counter(_void_rows(whole))
            assert not delivered - available
        else:
            np.testing.assert_array_equal(together, whole)
    # the epochs are dealt differently, each shard its own share
    assert shards[0].epoch_chunks(0) != shards[0].epoch_chunks(1)


def test_a_shard_short_of_samples_still_steps_with_empty_batches(tiny_task):
    """Batches of 1 over 3 shards: a shard with fewer samples than the common step count
    ends its epoch with empty batches, of the right shape, so every rank still steps (and a
    shard with more puts two samples in some batches)."""
    part, count = "val", 3
    n = tiny_task.samples[part]
    shards = [ChunkStream(tiny_task, part, batch_size=1).shard(i, count) for i in range(count)]
    steps = -(-n // count)
    total, empties = 0, 0
    for stream in shards:
        batches = list(stream.batches(0))
        assert len(batches) == steps == stream.steps_per_epoch()
        share = stream.shard_samples(0)
        for x, y in batches:
            assert x.shape == (len(y), 4) and x.dtype == y.dtype == np.float32
            assert len(y) in ((0, 1) if share < steps else (1, 2))
            empties += not len(y)
        total += sum(len(y) for _, y in batches)
        assert stream.stats.batches == steps and stream.stats.samples == share
    assert total == n and empties > 0


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_single_shard_cuts_batches_as_before(tiny_task, drop_last):
    """One shard: batches of B, then the remainder (dropped with drop_last), cut in order
    from the epoch's groups; `shard(0, 1)` changes nothing."""
    size, epoch = 1000, 1
    stream = ChunkStream(tiny_task, "train", batch_size=size, drop_last=drop_last)
    x, y = (np.concatenate(a) for a in zip(*stream.groups(epoch)))
    n = len(y)
    assert n == tiny_task.samples["train"]
    expected = [
        (x[i : i + size], y[i : i + size])
        for i in range(0, n, size)
        if not drop_last or i + size <= n
    ]
    assert len(expected) == (n // size if drop_last else -(-n // size))
    sharded = ChunkStream(tiny_task, "train", batch_size=size, drop_last=drop_last).shard(0, 1)
    for s in (stream, sharded):
        assert s.batch_sizes(epoch) is None and s.steps_per_epoch(epoch) == len(expected)
        got = list(s.batches(epoch))
        assert len(got) == len(expected)
        for (xg, yg), (xe, ye) in zip(got, expected):
            assert xg.shape == xe.shape
            np.testing.assert_array_equal(xg, xe)
            np.testing.assert_array_equal(yg, ye)


def test_planned_batches_keep_their_number_whatever_the_groups_hold():
    from cubebench.loading.stream import LoadStats, cut_batches

    def groups():
        return iter([(np.arange(5.0)[:, None], np.arange(5.0)), (np.full((2, 1), 9.0), [9, 9])])

    empty = (np.empty((0, 1)), np.empty(0))

    def sizes(plan, drop_last=False):
        stats = LoadStats()
        out = list(cut_batches(groups(), 3, drop_last, stats, plan, empty))
        assert stats.batches == len(out) == len(plan) and stats.epochs == 1
        for x, y in out:
            assert x.shape == (len(y), 1)
        return [len(y) for _, y in out]

    assert sizes([3, 3, 1]) == [3, 3, 1]
    assert sizes([3, 3, 2, 2]) == [3, 3, 1, 0]  # ran short: a shorter batch, then an empty one
    assert sizes([2, 2]) == [2, 5]  # more than planned: the last batch takes the rest
    assert sizes([2, 2], drop_last=True) == [2, 2]
    assert sizes([]) == []


def _whole_cube(layout: str, split: str | None = None):
    from cubebench.cube import open_cube

    cube = open_cube(f"synthetic:tiny?layout={layout}")
    return prepare_task(get_task("lst-from-t2m", split=split), cube)


@pytest.mark.parametrize(
    "layout", ["balanced", "map", pytest.param("5,7,11", marks=pytest.mark.slow)]
)
def test_read_amplification_is_one_over_the_whole_cube(layout):
    """A `chunks` split over the whole cube decodes nothing a part does not need: exactly 1
    on any layout. The physical split shares chunks between the parts: each part needs its
    share of a chunk, so together the parts need every chunk they read exactly once."""
    task = _whole_cube(layout, "chunks")
    for part in PARTS:
        stream = ChunkStream(task, part, batch_size=4096)
        for _ in stream.batches(0):
            pass
        assert stream.stats.bytes_needed == stream.stats.bytes_decoded > 0
        assert stream.stats.read_amplification == 1.0

    task = _whole_cube(layout)
    sizes = {
        c: int(np.prod([s.stop - s.start for s in w])) for c, w in _chunk_windows(task).items()
    }
    readers: Counter = Counter()
    needed_bytes = 0
    for part in PARTS:
        stream = ChunkStream(task, part, batch_size=4096)
        for _ in stream.batches(0):
            pass
        chunks, decoded, needed = _costs(task, part)
        assert stream.stats.chunks_decoded == len(chunks)
        assert stream.stats.bytes_decoded == decoded * 4 * 2
        assert stream.stats.bytes_needed == pytest.approx(needed * 4 * 2, abs=1)
        assert stream.stats.read_amplification == _amplification(decoded, needed)
        readers.update(chunks)
        needed_bytes += stream.stats.bytes_needed
    assert max(readers.values()) > 1  # a chunk read by several parts
    assert needed_bytes == pytest.approx(sum(sizes[c] for c in readers) * 4 * 2, abs=3)


# blocks of whole chunks of tiny (12 steps x 12 x 23 pixels): the transfer task's region grid
# in steps and pixels, the box task's `chunks` split
CHUNK_GRIDS = {
    "lst-from-t2m-transfer": "region:12t,12px,23px",
    "lst-from-t2m-box-and-season": "chunks",
}


@pytest.mark.parametrize("name", ["lst-from-t2m-transfer", "lst-from-t2m-box-and-season"])
def test_read_amplification_counts_the_cells_a_box_cuts_off(tiny, name):
    """tiny's chunk rows of 12 x 4 degrees straddle 20 and 70 degrees north: the cells
    beyond the box are decoded for nothing. On blocks of whole chunks that is the only cost
    (the part needs the cells of its chunks in the box); on the task's physical grid the parts
    also share chunks. The ratio equals a count on numpy masks, for one stream and for two
    shards together."""
    from dataclasses import replace

    from cubebench.loading import LoadStats
    from cubebench.task import Box

    if name == "lst-from-t2m-transfer":
        spec = get_task(name)
    else:
        spec = get_task(
            "lst-from-t2m", region=Box(20, 70, -20, 60), time_range=("2001-03-01", "2001-08-31")
        )
    region = ("target_train",) if spec.split.kind == "region" else ()
    for split in (CHUNK_GRIDS[name], None):
        task = prepare_task(replace(spec, split=split) if split else spec, tiny)
        for part in ("train", "test", *region):
            chunks, decoded, needed = _costs(task, part)
            expected = decoded / needed
            assert expected > 1
            if split:  # no chunk shared: the part needs its chunks' cells in the box
                selected, windows = _selected(task, part), _chunk_windows(task)
                assert needed == sum(int(selected[windows[c]].sum()) for c in chunks)
            stream = ChunkStream(task, part, batch_size=1000)
            for _ in stream.batches(0):
                pass
            assert stream.chunks == chunks
            assert stream.stats.chunks_decoded == len(chunks)
            assert stream.stats.read_amplification == _amplification(decoded, needed)
            shards = [ChunkStream(task, part, batch_size=1000).shard(i, 2) for i in range(2)]
            total = LoadStats()
            for shard in shards:
                for _ in shard.batches(3):
                    pass
                total = total + shard.stats
            assert total.chunks_decoded == len(chunks)
            assert total.read_amplification == _amplification(decoded, needed, roundings=2)
