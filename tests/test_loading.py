"""The streaming loader: exactly once, no leakage, determinism, adapters, cost counters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
