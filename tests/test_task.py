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


def test_default_blocks_are_46_days_by_10_degrees(tiny_task):
    """The default grid is physical: a block spans 46 days from the cube's first date and a
    10° band of latitude (from 90° S) and of longitude (from 180° W), whatever the chunks."""
    days = (tiny_task.cube["time"].to_index() - tiny_task.cube["time"].to_index()[0]).days
    lat, lon = tiny_task.coords.lat, tiny_task.coords.lon
    for axis, label in enumerate(
        (days // 46, np.floor((lat + 90) / 10), np.floor((lon + 180) % 360 / 10))
    ):
        edges = tiny_task.block_edges[axis]
        for start, stop in itertools.pairwise(edges):
            assert len(set(np.asarray(label[start:stop]).tolist())) == 1  # one label a block
        assert (np.asarray(label[edges[1:-1]]) != np.asarray(label[edges[1:-1] - 1])).all()


def test_chunks_split_blocks_are_whole_chunks(tiny):
    task = prepare_task(get_task("lst-from-t2m", split="chunks"), tiny)
    chunks = task.cube["land_surface_temperature"].chunks
    boundaries = [set(np.concatenate([[0], np.cumsum(c)]).tolist()) for c in chunks]
    for part in PARTS:
        for block in task.blocks[part]:
            for s, edges in zip(task.block_slices(block), boundaries):
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
    task = prepare_task(get_task("lst-from-t2m", split="chunks:4,1,1"), tiny)
    assert task.block_shape[0] == 46 < 4 * task.chunk_shape[0]  # the axis ends first
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
        "lst-from-t2m-transfer", source_box=Box(5, 60), target_box=Box(-40, 3)
    )  # the 0..10° N band of blocks touches both boxes
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


def _chunk_counts_reference(task, part) -> tuple[dict[tuple, int], dict[tuple, int]]:
    """Valid samples and cells (valid or not) of the part per chunk holding any of its cells,
    counted on the numpy cube."""
    _, _, valid = _full_arrays(task)
    sel = task.selections[part]
    cells = _part_mask(task, part)
    cells &= sel.time[:, None, None] & sel.lat[None, :, None] & sel.lon[None, None, :]
    chunks = task.cube["land_surface_temperature"].chunks
    edges = [np.concatenate([[0], np.cumsum(c)]) for c in chunks]
    counts, sizes = {}, {}
    for chunk in itertools.product(*(range(len(c)) for c in chunks)):
        window = tuple(slice(int(e[c]), int(e[c + 1])) for e, c in zip(edges, chunk))
        if cells[window].any():
            counts[chunk] = int((cells & valid)[window].sum())
            sizes[chunk] = int(cells[window].sum())
    return counts, sizes


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("lst-from-t2m", "chunks"),
        ("lst-from-t2m", "chunks:2,2,1"),
        ("lst-from-t2m", None),
        ("lst-from-t2m", "time"),
        ("lst-from-t2m-transfer", None),
    ],
)
def test_chunk_samples_count_each_chunks_valid_pixels(tiny, name, split):
    """The dask pass also counts every chunk's valid samples per part (chunk-aligned blocks,
    physical blocks and periods whose chunks several parts share, region split too): they
    equal a count on the numpy cube, chunk by chunk, for every chunk holding cells of the
    part, and add up to the part's samples; the part's cells per chunk too."""
    task = prepare_task(get_task(name, split=split), tiny)
    assert set(task.chunk_samples) == set(task.spec.parts)
    for part in task.spec.parts:
        counts, sizes = _chunk_counts_reference(task, part)
        assert task.chunk_samples[part] == counts
        assert sum(counts.values()) == task.samples[part] > 0
        got = {
            c: int(task.chunk_cells[part][c])
            for c in map(tuple, np.argwhere(task.chunk_cells[part]))
        }
        assert got == sizes
