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
from cubebench.task import PARTS


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


@pytest.mark.parametrize("reader", ["tensorstore", "zarr", "xarray"])
@pytest.mark.parametrize("part", PARTS)
def test_every_valid_sample_exactly_once(tiny_task, part, reader):
    stream = ChunkStream(tiny_task, part, batch_size=1000, reader=reader, buffer_chunks=3)
    x, y, sizes = _collect(stream.batches(epoch=0))
    assert len(y) == tiny_task.samples[part]
    np.testing.assert_allclose(_rows(x, y), _reference(tiny_task, part), rtol=0, atol=2e-5)
    # all batches full but the last, which is kept
    assert all(s == 1000 for s in sizes[:-1]) and 0 < sizes[-1] <= 1000


def test_readers_are_offered_fastest_first(tiny_task):
    assert available_readers(tiny_task.cube)[0] == "tensorstore"
    assert available_readers(tiny_task.cube)[-1] == "xarray"


def test_drop_last_drops_only_the_partial_batch(tiny_task):
    stream = ChunkStream(tiny_task, "train", batch_size=1000, drop_last=True)
    _, y, sizes = _collect(stream.batches(0))
    assert set(sizes) == {1000}
    assert len(y) == tiny_task.samples["train"] // 1000 * 1000


def test_no_chunk_is_shared_between_parts(tiny_task):
    chunks = {p: set(ChunkStream(tiny_task, p).chunks) for p in PARTS}
    assert not chunks["train"] & chunks["val"]
    assert not chunks["train"] & chunks["test"]
    assert not chunks["val"] & chunks["test"]


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


def test_counters_are_consistent(tiny_task):
    stream = ChunkStream(tiny_task, "test", batch_size=700)
    for _ in stream.batches(0):
        pass
    stats = stream.stats
    windows = [stream.chunk_slices(c) for c in stream.chunks]
    chunk_bytes = sum(int(np.prod([w.stop - w.start for w in win])) * 4 for win in windows)
    assert stats.chunks_decoded == len(stream.chunks)
    assert stats.bytes_decoded == chunk_bytes * 2  # input and target
    assert stats.read_amplification == 1.0
    assert stats.samples == tiny_task.samples["test"]
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


@pytest.mark.parametrize("workers", [0, 1, 2])
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


@pytest.mark.parametrize("adapter", ["numpy", "torch", "tf"])
def test_bench_loader_cli_reports_costs(tiny_task, adapter):
    command = ["bench-loader", "--cube", "synthetic:tiny", "--adapter", adapter, "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "cubebench", *command],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["pairs"] == row["expected_pairs"] == tiny_task.samples["train"]
    for key in ("pairs_per_s", "raw_decode_pairs_per_s", "ratio_to_raw", "peak_rss_mb"):
        assert row[key] > 0
    assert row["raw_reader"] in row["raw_by_reader"]
    assert row["read_amplification"] == 1.0
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


def _whole_cube(layout: str):
    from cubebench.cube import open_cube
    from cubebench.task import get_task, prepare_task

    return prepare_task(get_task("lst-from-t2m"), open_cube(f"synthetic:tiny?layout={layout}"))


@pytest.mark.parametrize("layout", ["balanced", "map", "5,7,11"])
def test_read_amplification_is_one_over_the_whole_cube(layout):
    task = _whole_cube(layout)
    for part in PARTS:
        stream = ChunkStream(task, part, batch_size=4096)
        for _ in stream.batches(0):
            pass
        assert stream.stats.bytes_needed == stream.stats.bytes_decoded > 0
        assert stream.stats.read_amplification == 1.0


def _expected_amplification(task, part: str) -> tuple[float, int]:
    """Decoded / needed cells, counted on numpy masks: every chunk of the part's blocks that
    overlaps its selection is decoded whole; the part needs the cells in its blocks and its
    selection. Also the number of such chunks."""
    shape = task.cube["land_surface_temperature"].shape
    sel = task.selections[part]
    selected = sel.time[:, None, None] & sel.lat[None, :, None] & sel.lon[None, None, :]
    in_blocks = np.zeros(shape, bool)
    for block in task.blocks[part]:
        in_blocks[task.block_slices(block)] = True
    edges = [
        np.concatenate([[0], np.cumsum(c)]) for c in task.cube["land_surface_temperature"].chunks
    ]
    decoded, chunks = 0, 0
    for chunk in np.ndindex(*(len(e) - 1 for e in edges)):
        window = tuple(slice(int(e[c]), int(e[c + 1])) for e, c in zip(edges, chunk))
        if in_blocks[window].all() and selected[window].any():
            decoded += in_blocks[window].size
            chunks += 1
    return decoded / int((in_blocks & selected).sum()), chunks


@pytest.mark.parametrize("name", ["lst-from-t2m-transfer", "lst-from-t2m-box-and-season"])
def test_read_amplification_counts_the_cells_a_box_cuts_off(tiny, name):
    """tiny's chunk rows of 12 x 4 degrees straddle 20 and 70 degrees north: the cells
    beyond the box are decoded for nothing. The ratio equals a count on numpy masks, for one
    stream and for two shards together."""
    from cubebench.loading import LoadStats
    from cubebench.task import Box, get_task, prepare_task

    if name == "lst-from-t2m-transfer":
        spec = get_task(name)
    else:
        spec = get_task(
            "lst-from-t2m", region=Box(20, 70, -20, 60), time_range=("2001-03-01", "2001-08-31")
        )
    task = prepare_task(spec, tiny)
    for part in ("train", "test", *(("target_train",) if spec.split == "region" else ())):
        expected, chunks = _expected_amplification(task, part)
        assert expected > 1
        stream = ChunkStream(task, part, batch_size=1000)
        for _ in stream.batches(0):
            pass
        assert stream.stats.chunks_decoded == chunks
        assert stream.stats.read_amplification == expected
        shards = [ChunkStream(task, part, batch_size=1000).shard(i, 2) for i in range(2)]
        total = LoadStats()
        for shard in shards:
            for _ in shard.batches(3):
                pass
            total = total + shard.stats
        assert total.read_amplification == expected
