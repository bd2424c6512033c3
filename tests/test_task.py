"""Task preparation: chunk-aligned block split without leakage, train-only statistics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cubebench.cube import open_cube
from cubebench.errors import TaskError
from cubebench.task import PARTS, TARGET_PARTS, Box, assign_blocks, get_task, prepare_task


def _full_arrays(task):
    """The cube as numpy, with the reference valid mask: the ground truth for these tests."""
    ds = task.cube
    t2m = ds["air_temperature_2m"].values.astype(np.float64)
    lst = ds["land_surface_temperature"].values.astype(np.float64)
    return t2m, lst, np.isfinite(t2m) & np.isfinite(lst)


def _part_mask(task, part):
    mask = np.zeros(task.cube["land_surface_temperature"].shape, bool)
    for block in task.blocks[part]:
        mask[task.block_slices(block)] = True
    return mask


def test_blocks_are_whole_chunks(tiny_task):
    chunks = tiny_task.cube["land_surface_temperature"].chunks
    boundaries = [set(np.concatenate([[0], np.cumsum(c)]).tolist()) for c in chunks]
    for part in PARTS:
        for block in tiny_task.blocks[part]:
            for s, edges in zip(tiny_task.block_slices(block), boundaries):
                assert s.start in edges and s.stop in edges


def test_split_is_disjoint_and_covers_every_block_with_data(tiny_task):
    _, _, valid = _full_arrays(tiny_task)
    seen: dict[tuple, str] = {}
    for part in PARTS:
        for block in map(tuple, tiny_task.blocks[part]):
            assert block not in seen, f"block {block} in {seen.get(block)} and {part}"
            seen[block] = part
    with_data = {
        block
        for block in np.ndindex(*tiny_task.block_grid)
        if valid[tiny_task.block_slices(block)].any()
    }
    assert set(seen) == with_data
    total = int(np.prod(tiny_task.block_grid))
    assert tiny_task.blocks_without_samples == total - len(with_data)
    # pixel level: the parts tile the valid pixels exactly
    masks = [_part_mask(tiny_task, p) for p in PARTS]
    assert not (masks[0] & masks[1]).any() and not (masks[0] & masks[2]).any()
    assert not (masks[1] & masks[2]).any()
    for part, mask in zip(PARTS, masks):
        assert tiny_task.samples[part] == int((valid & mask).sum())
    assert sum(tiny_task.samples.values()) == int(valid.sum())


def test_split_fractions_and_seed(tiny):
    a = prepare_task(get_task("lst-from-t2m", seed=0), tiny)
    b = prepare_task(get_task("lst-from-t2m", seed=0), tiny)
    c = prepare_task(get_task("lst-from-t2m", seed=1), tiny)
    n = sum(len(v) for v in a.blocks.values())
    assert abs(len(a.blocks["train"]) - 0.7 * n) <= 1
    assert abs(len(a.blocks["test"]) - 0.15 * n) <= 1
    for part in PARTS:
        np.testing.assert_array_equal(a.blocks[part], b.blocks[part])
    assert not np.array_equal(a.blocks["test"], c.blocks["test"])


def test_statistics_equal_numpy_on_train_pixels_only(tiny_task):
    t2m, lst, valid = _full_arrays(tiny_task)
    train = valid & _part_mask(tiny_task, "train")
    it, iy, _ = np.nonzero(train)
    lat = tiny_task.cube["lat"].values[iy]
    season = 2 * np.pi * (tiny_task.cube["time"].dt.day_of_year.values[it] - 1) / 365
    columns = [t2m[train], lat, np.sin(season), np.cos(season)]
    np.testing.assert_allclose(tiny_task.feature_mean, [c.mean() for c in columns], rtol=1e-10)
    np.testing.assert_allclose(tiny_task.feature_std, [c.std() for c in columns], rtol=1e-10)
    assert tiny_task.target_mean == pytest.approx(lst[train].mean(), rel=1e-12)
    assert tiny_task.target_std == pytest.approx(lst[train].std(), rel=1e-10)
    # and they differ from statistics over all pixels: test data did not leak into them
    assert abs(tiny_task.target_mean - lst[valid].mean()) > 1e-3


def test_reference_samples_match_numpy(tiny_task):
    t2m, lst, valid = _full_arrays(tiny_task)
    x, y = tiny_task.load_part("test")
    mask = valid & _part_mask(tiny_task, "test")
    assert sorted(y.tolist()) == sorted(lst[mask].tolist())
    assert sorted(x[:, 0].tolist()) == sorted(t2m[mask].tolist())
    xn, yn = tiny_task.normalize(x, y)
    assert xn.shape == x.shape and np.isfinite(xn).all() and np.isfinite(yn).all()


def test_block_chunks_group_whole_chunks(tiny):
    task = prepare_task(get_task("lst-from-t2m", block_chunks=(4, 1, 1)), tiny)
    assert task.block_shape[0] == 4 * task.chunk_shape[0]
    assert task.block_grid[0] == 1  # the whole year in one block: split by space only
    for part in PARTS:
        for block in task.blocks[part]:
            assert task.block_slices(block)[0] == slice(0, 46)


def test_region_and_time_restrict_samples(tiny):
    box = Box(20, 70, -20, 60)
    task = prepare_task(
        get_task("lst-from-t2m", region=box, time_range=("2001-03-01", "2001-08-31")), tiny
    )
    for part in PARTS:
        x, _ = task.load_part(part)
        assert ((x[:, 1] >= 20) & (x[:, 1] <= 70)).all()
    time = tiny["time"].to_index()
    inside = (time >= "2001-03-01") & (time <= "2001-08-31")
    lst = tiny["land_surface_temperature"].sel(lat=slice(70, 20), lon=slice(-20, 60))
    expected = int(np.isfinite(lst.values[inside]).sum())
    assert sum(task.samples.values()) == expected


def test_region_split_keeps_source_and_target_apart(tiny):
    task = prepare_task(get_task("lst-from-t2m-transfer"), tiny)
    source = {tuple(b) for p in PARTS for b in task.blocks[p]}
    target = {tuple(b) for p in TARGET_PARTS for b in task.blocks[p]}
    assert source and target and not source & target
    for part in PARTS:
        x, _ = task.load_part(part)
        assert ((x[:, 1] >= 20) & (x[:, 1] <= 70)).all()
    for part in TARGET_PARTS:
        x, _ = task.load_part(part)
        assert ((x[:, 1] >= -60) & (x[:, 1] <= -10)).all()
        assert task.samples[part] == len(x) > 0


def test_region_split_drops_blocks_touching_both_boxes(tiny):
    spec = get_task(
        "lst-from-t2m-transfer", source_box=Box(10, 60), target_box=Box(-40, -1)
    )  # tiny's lat chunks straddle the equator
    task = prepare_task(spec, tiny)
    assert task.blocks_in_both_boxes > 0
    source = {tuple(b) for p in PARTS for b in task.blocks[p]}
    target = {tuple(b) for p in TARGET_PARTS for b in task.blocks[p]}
    assert not source & target


@pytest.mark.server  # a dask LocalCluster
def test_statistics_on_a_dask_cluster_equal_single_process(tiny_task, tiny):
    """A real LocalCluster of worker processes computes the same split and statistics."""
    distributed = prepare_task(get_task("lst-from-t2m"), tiny, scheduler="local")
    for part in PARTS:
        np.testing.assert_array_equal(distributed.blocks[part], tiny_task.blocks[part])
    np.testing.assert_allclose(distributed.feature_mean, tiny_task.feature_mean, rtol=1e-12)
    np.testing.assert_allclose(distributed.feature_std, tiny_task.feature_std, rtol=1e-12)
    assert distributed.samples == tiny_task.samples


def test_assign_blocks_gives_each_part_a_block_or_says_why():
    blocks = [(0, 0, i) for i in range(3)]
    parts = assign_blocks(blocks, (0.7, 0.15, 0.15), seed=0)
    assert sorted(len(v) for v in parts.values()) == [1, 1, 1]
    with pytest.raises(TaskError, match="too few"):
        assign_blocks(blocks[:2], (0.7, 0.15, 0.15), seed=0)
    only_train = assign_blocks(blocks, (1.0, 0.0, 0.0), seed=0)
    assert len(only_train["train"]) == 3 and not only_train["val"] and not only_train["test"]


def test_fingerprint_is_stable_and_sensitive(tmp_path, tiny_task, tiny):
    from cubebench.cube import cube_fingerprint, make_cube

    same = prepare_task(get_task("lst-from-t2m"), open_cube("synthetic:tiny"))
    assert same.fingerprint == tiny_task.fingerprint
    rechunked = open_cube(str(make_cube("tiny", layout="map", output=tmp_path / "m.zarr")))
    assert cube_fingerprint(rechunked) != cube_fingerprint(tiny)
    other_seed = open_cube(str(make_cube("tiny", seed=5, output=tmp_path / "s.zarr")))
    assert cube_fingerprint(other_seed) != cube_fingerprint(tiny)


def _chunk_counts_reference(task, part) -> dict[tuple, int]:
    """Valid samples of the part per chunk of its blocks, counted on the numpy cube."""
    _, _, valid = _full_arrays(task)
    sel = task.selections[part]
    mask = valid & _part_mask(task, part)
    mask &= sel.time[:, None, None] & sel.lat[None, :, None] & sel.lon[None, None, :]
    chunks = task.cube["land_surface_temperature"].chunks
    edges = [np.concatenate([[0], np.cumsum(c)]) for c in chunks]
    counts = {}
    for block in task.blocks[part]:
        ranges = [
            range(*np.searchsorted(e, [s.start, s.stop]).tolist())
            for e, s in zip(edges, task.block_slices(block))
        ]
        for chunk in itertools.product(*ranges):
            window = tuple(slice(int(e[c]), int(e[c + 1])) for e, c in zip(edges, chunk))
            counts[chunk] = int(mask[window].sum())
    return counts


@pytest.mark.parametrize(
    ("name", "block_chunks"),
    [("lst-from-t2m", (1, 1, 1)), ("lst-from-t2m", (2, 2, 1)), ("lst-from-t2m-transfer", None)],
)
def test_chunk_samples_count_each_chunks_valid_pixels(tiny, name, block_chunks):
    """The dask pass also counts every chunk's valid samples per part (blocks of one or of
    several chunks, region split too): they equal a count on the numpy cube, chunk by chunk,
    for every chunk of the part's blocks, and add up to the part's samples."""
    task = prepare_task(get_task(name, block_chunks=block_chunks), tiny)
    assert set(task.chunk_samples) == set(task.spec.parts)
    for part in task.spec.parts:
        counts = task.chunk_samples[part]
        assert counts == _chunk_counts_reference(task, part)
        assert sum(counts.values()) == task.samples[part] > 0
