"""Splits in the units of the science: layout-independent parts, buffers, the loader's masks.

Every kind of split (`blocks`, `time`, `region`, `chunks`) on the tiny cube (46 x 45 x 90) in
its three layouts: the parts do not change with the chunking (but for `chunks`), a buffer
keeps a ring of blocks between parts, the loader delivers each sample of a part once even
where a chunk holds several parts, and what that masking costs is the read amplification.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cubebench.errors import TaskError
from cubebench.loading import open_stream
from cubebench.oracle import noise_free_target
from cubebench.splits import Split, grid_of
from cubebench.task import BUFFER, PARTS, get_task, prepare_task, with_split
from run_cli import run_cubebench

LAYOUTS = ("map", "ts", "balanced")
CUBES = {layout: f"synthetic:tiny?layout={layout}" for layout in LAYOUTS} | {
    "balanced-v2": "synthetic:tiny?layout=balanced&format=2"
}
# the splits whose parts must not depend on the chunking
INVARIANT_SPLITS = ("blocks", "time", "time:2001-08-31,2001-10-31", "blocks:4t,20deg")
CASES_DIR = Path(__file__).resolve().parents[1] / "cases"

# xarray writes consolidated metadata by default; zarr warns that v3 does not specify it yet
pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cubes(cube_cache):
    """The tiny cube in every layout (and balanced in Zarr v2), generated and opened once."""
    from cubebench.cube import open_cube

    return {name: open_cube(spec) for name, spec in CUBES.items()}


@pytest.fixture(scope="module")
def prepared(cubes):
    """`prepared(split, cube, task, buffer)`: a prepared task, made once per module."""
    made: dict[tuple, object] = {}

    def get(split=None, cube="balanced", task="lst-from-t2m", buffer=None):
        key = (split, cube, task, buffer)
        if key not in made:
            made[key] = prepare_task(with_split(get_task(task), split, buffer), cubes[cube])
        return made[key]

    return get


def _rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Samples as rows (features..., target) sorted by the coordinate features first (lat,
    sin, cos: exact in the loader too), then the input and the target: a multiset."""
    rows = np.column_stack([x, y]).astype(np.float64)
    keys = [rows[:, j] for j in (1, 2, 3, 0, 4)]
    return rows[np.lexsort(keys[::-1])]


def _stream_epoch(task, part: str, epoch: int = 1):
    """One shuffled epoch of the part's stream: (X, y) together, and the stream."""
    stream = open_stream(task, part, batch_size=1000, shuffle=True, threads=2, buffer_chunks=3)
    xs, ys = [], []
    for x, y in stream.batches(epoch):
        assert x.dtype == np.float32 and y.dtype == np.float32
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys), stream


def _noise_floor(task) -> float:
    """The realised noise floor of the test part: RMSE of the noise-free target."""
    oracle = noise_free_target(task)
    assert oracle is not None
    x, y = task.load_part("test")
    return float(np.sqrt(np.mean((y - oracle(task.normalize(x))) ** 2)))


def _valid(task) -> np.ndarray:
    ds = task.cube
    return np.isfinite(ds["air_temperature_2m"].values) & np.isfinite(
        ds["land_surface_temperature"].values
    )


def _pixels_of(task, part: str) -> np.ndarray:
    """The part's pixels, from its block list and its selection, on a numpy cube."""
    mask = np.zeros(task.cube["land_surface_temperature"].shape, bool)
    for block in task.blocks[part]:
        mask[task.block_slices(block)] = True
    sel = task.selections[part]
    return mask & sel.time[:, None, None] & sel.lat[None, :, None] & sel.lon[None, None, :]


def _near(a: np.ndarray, b: np.ndarray, grid, n: int, wrap: bool = True) -> np.ndarray:
    """(len a, len b): whether block a[i] lies within n blocks of b[j] (Chebyshev, diagonals
    included; periodic axes of the grid wrap when `wrap`)."""
    d = np.abs(a[:, None, :] - b[None, :, :])
    for axis, periodic in enumerate(grid.periodic):
        if periodic and wrap:
            d[..., axis] = np.minimum(d[..., axis], grid.shape[axis] - d[..., axis])
    return d.max(axis=2) <= n


# --- with_split and Split -------------------------------------------------------------------


def test_with_split_applies_the_command_line():
    """`--split`/`--buffer` land in the spec; the transfer task keeps its boxes (a grid
    changes its blocks, a time split leaves it as it is); a region split needs boxes."""
    plain = get_task("lst-from-t2m")
    assert plain.split == Split.parse("blocks:46d,10deg")
    timed = with_split(plain, "time")
    assert timed.split == Split("time") == get_task("lst-from-t2m", split="time").split
    assert with_split(plain, None, 3).split == Split(buffer=3)
    assert with_split(plain, "time:2001-08-31,2001-10-31", 2).split == Split(
        "time", dates=("2001-08-31", "2001-10-31"), buffer=2
    )
    transfer = get_task("lst-from-t2m-transfer")
    gridded = with_split(transfer, "blocks:4t,20deg", 1)
    assert gridded.split == Split("region", "4t", "20deg", buffer=1)
    assert (gridded.source_box, gridded.target_box) == (transfer.source_box, transfer.target_box)
    assert with_split(transfer, "time").split == transfer.split
    with pytest.raises(TaskError, match="region"):
        with_split(plain, "region")


@pytest.mark.parametrize(
    "text", ["blocks:46d,10deg", "blocks:4t,20px", "time", "time:2001-08-31,2001-10-31"]
)
def test_split_text_round_trips(text):
    """`str(Split.parse(text))` is the text again, with its buffer appended."""
    assert str(Split.parse(text)) == text
    assert str(Split.parse(text, buffer=2)) == f"{text} buffer 2"


# --- 1. the same parts on every layout ------------------------------------------------------


@pytest.mark.parametrize(
    "split",
    [s if s == "blocks" else pytest.param(s, marks=pytest.mark.slow) for s in INVARIANT_SPLITS],
)
def test_test_set_and_noise_floor_do_not_depend_on_the_layout(prepared, split):
    """map, ts and balanced (and Zarr v2 against v3) chunk tiny differently, yet give the same
    blocks per part, the same test samples (as a multiset) and the same realised noise floor."""
    reference = prepared(split, "balanced")
    expected = _rows(*reference.load_part("test"))
    floor = _noise_floor(reference)
    assert len(expected) == reference.samples["test"] > 0 and floor > 0
    chunk_shapes = {reference.chunk_shape}
    for cube in ("map", "ts", "balanced-v2"):
        task = prepared(split, cube)
        chunk_shapes.add(task.chunk_shape)
        assert task.summary()["layout_dependent_split"] is False
        np.testing.assert_array_equal(task.part_of_block, reference.part_of_block)
        assert task.samples == reference.samples
        assert np.array_equal(_rows(*task.load_part("test")), expected), cube
        assert _noise_floor(task) == pytest.approx(floor, rel=1e-12), cube
        # the train statistics too, merged in another order (sin_doy's mean is about 0)
        np.testing.assert_allclose(
            task.feature_mean, reference.feature_mean, rtol=1e-12, atol=1e-12
        )
    assert len(chunk_shapes) == 3  # premise: three chunkings (v2 shares balanced's)


def test_chunks_split_changes_with_the_layout(prepared):
    """The documented exception: `chunks` blocks are storage chunks, so the layouts give
    different test sets; in exchange no chunk holds two parts."""
    tests = {}
    for layout in LAYOUTS:
        task = prepared("chunks", layout)
        assert task.summary()["layout_dependent_split"] is True
        tests[layout] = _rows(*task.load_part("test"))
        holders = sum((task.chunk_cells[p] > 0).astype(int) for p in PARTS)
        assert holders.max() == 1
    pairs = itertools.combinations(tests.values(), 2)
    assert not all(a.shape == b.shape and np.array_equal(a, b) for a, b in pairs)


def test_time_split_follows_its_dates(prepared):
    """`time:2001-08-31,2001-10-31`: train up to 31 August, val up to 31 October, test after."""
    task = prepared("time:2001-08-31,2001-10-31")
    assert task.grid.shape == (46, 1, 1)
    time = task.cube["time"].to_index()
    part = task.part_of_block[:, 0, 0]
    expected = np.where(time <= "2001-08-31", 0, np.where(time <= "2001-10-31", 1, 2))
    np.testing.assert_array_equal(part, expected)
    assert set(part.tolist()) == {0, 1, 2}


# --- 2. the loader: every sample of every part once -----------------------------------------

LOADER_CASES = {  # kind -> (task, split); all on the balanced layout
    "blocks": ("lst-from-t2m", "blocks"),
    "time": ("lst-from-t2m", "time"),
    "chunks": ("lst-from-t2m", "chunks"),
    "region": ("lst-from-t2m-transfer", None),
}


@pytest.mark.parametrize("kind", list(LOADER_CASES))
def test_one_epoch_delivers_each_sample_of_each_part_once(prepared, kind):
    """A shuffled epoch of every part's stream holds exactly the part's reference samples
    (normalised, float32), as many as `samples` says; the parts share no pixel and no sample,
    also where a chunk holds cells of several parts (every kind but `chunks`)."""
    name, split = LOADER_CASES[kind]
    task = prepared(split, "balanced", name)
    assert task.spec.split.kind == kind
    parts = task.spec.parts
    holders = sum((task.chunk_cells[p] > 0).astype(int) for p in parts)
    assert (holders.max() > 1) == (kind != "chunks")  # premise: chunks shared, to be masked
    valid = _valid(task)
    pixels, delivered = {}, {}
    for part in parts:
        x, y, stream = _stream_epoch(task, part)
        assert len(y) == stream.stats.samples == task.samples[part] > 0, part
        xr, yr = task.normalize(*task.load_part(part))
        expected = _rows(xr.astype(np.float32), yr.astype(np.float32))
        np.testing.assert_allclose(_rows(x, y), expected, rtol=0, atol=2e-5, err_msg=part)
        rows = np.column_stack([x, y])
        delivered[part] = {r.tobytes() for r in rows}
        assert len(delivered[part]) == len(rows), f"{part}: a sample delivered twice"
        pixels[part] = _pixels_of(task, part)
        assert int((pixels[part] & valid).sum()) == task.samples[part], part
    for a, b in itertools.combinations(parts, 2):
        assert not (pixels[a] & pixels[b]).any(), f"a pixel in {a} and {b}"
        assert not delivered[a] & delivered[b], f"a sample in {a} and {b}"


# --- 3. buffers -----------------------------------------------------------------------------


def test_buffer_keeps_a_ring_of_blocks_between_parts(prepared):
    """Buffer 1 on 4 steps x 20 degrees: no train block within a block (diagonals and the
    antimeridian included) of a val or test block, no val block next to a test block; just
    the blocks next to a later part's went, test stays whole, and the summary counts them."""
    split = "blocks:4t,20deg"
    plain, task = prepared(split), prepared(split, buffer=1)
    grid = task.grid
    assert grid.shape == (12, 9, 18) and grid.periodic == (False, False, True)
    kept, before = task.blocks, plain.blocks
    assert not _near(kept["train"], kept["val"], grid, 1).any()
    assert not _near(kept["train"], kept["test"], grid, 1).any()
    assert not _near(kept["val"], kept["test"], grid, 1).any()
    # test whole: the same blocks and samples as without a buffer
    np.testing.assert_array_equal(kept["test"], before["test"])
    assert task.samples["test"] == plain.samples["test"]
    assert np.array_equal(_rows(*task.load_part("test")), _rows(*plain.load_part("test")))
    buffered = task.summary()["buffered"]
    assert buffered["test"] == {"blocks": 0, "samples": 0}
    dropped_total = 0
    for part, later in (("train", ("val", "test")), ("val", ("test",))):
        later_blocks = np.concatenate([before[p] for p in later])
        must_go = _near(before[part], later_blocks, grid, 1).any(axis=1)
        across = must_go & ~_near(before[part], later_blocks, grid, 1, wrap=False).any(axis=1)
        if part == "train":  # premise: some blocks only touch a later one across 180 degrees
            assert across.any()
        went = {tuple(b) for b in before[part]} - {tuple(b) for b in kept[part]}
        assert went == {tuple(b) for b in before[part][must_go]}, part
        assert {tuple(b) for b in kept[part]} <= {tuple(b) for b in before[part]}
        assert buffered[part]["blocks"] == len(went) > 0, part
        assert buffered[part]["samples"] == plain.samples[part] - task.samples[part] > 0, part
        dropped_total += len(went)
    assert int((task.part_of_block == BUFFER).sum()) == dropped_total


@pytest.mark.parametrize("split", ["time", "time:2001-08-31,2001-10-31"])
def test_time_buffer_leaves_out_the_steps_before_a_later_period(prepared, split):
    """Buffer 2 on a time split: the last 2 time steps before val and before test go; the
    summary counts them (2 steps, their valid pixels) and the periods keep their other steps."""
    plain, task = prepared(split), prepared(split, buffer=2)
    before = plain.part_of_block[:, 0, 0]
    assert np.all(np.diff(before) >= 0) and set(before.tolist()) == {0, 1, 2}  # premise
    val_start, test_start = int(np.argmax(before == 1)), int(np.argmax(before == 2))
    assert test_start - val_start > 2  # premise: val outlives its buffer
    expected = before.copy()
    expected[val_start - 2 : val_start] = BUFFER
    expected[test_start - 2 : test_start] = BUFFER
    np.testing.assert_array_equal(task.part_of_block[:, 0, 0], expected)
    per_step = _valid(task).sum(axis=(1, 2))
    assert task.summary()["buffered"] == {
        "train": {"blocks": 2, "samples": int(per_step[val_start - 2 : val_start].sum())},
        "val": {"blocks": 2, "samples": int(per_step[test_start - 2 : test_start].sum())},
        "test": {"blocks": 0, "samples": 0},
    }
    for part in ("train", "val"):
        assert task.samples[part] == plain.samples[part] - task.buffered[part]["samples"]
    assert task.samples["test"] == plain.samples["test"]


# --- 4. the cost of a split that does not follow the chunks ---------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_time_split_read_amplification(prepared, layout):
    """One train epoch of a `time` split decodes whole chunks: on ts (a chunk spans all 46
    steps) every chunk, for 32 train steps: 46 / 32; on balanced the chunks up to step 36:
    36 / 32; on map (one step a chunk) just the train steps: 1."""
    task = prepared("time", layout)
    _, y, stream = _stream_epoch(task, "train", epoch=0)
    assert len(y) == task.samples["train"]
    chunks = task.part_chunks("train")
    decoded = sum(int(np.prod([s.stop - s.start for s in task.chunk_slices(c)])) for c in chunks)
    needed = int(task.chunk_cells["train"].sum())
    train_steps = len(task.blocks["train"])
    assert train_steps == 32 and needed == train_steps * 45 * 90
    assert stream.stats.chunks_decoded == len(chunks)
    amplification = stream.stats.read_amplification
    assert amplification == pytest.approx(decoded / needed, rel=1e-12)
    expected = {"ts": 46 / 32, "balanced": 36 / 32, "map": 1.0}[layout]
    assert amplification == pytest.approx(expected, rel=1e-12)
    if layout == "map":
        assert amplification == 1.0


def test_bench_loader_cli_takes_the_split(prepared, tiny):
    """`bench-loader --split time` on ts: every train sample, at the amplification of 46/32."""
    import json

    task = prepared("time", "ts")
    proc = run_cubebench(
        "bench-loader",
        "--cube",
        CUBES["ts"],
        "--split",
        "time",
        "--epochs",
        "1",
        "--max-seconds",
        "0",
        "--json",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["pairs"] == row["expected_pairs"] == task.samples["train"]
    assert row["read_amplification"] == pytest.approx(46 / 32, rel=1e-12)


# --- 5. user mistakes at the command line ---------------------------------------------------

# id -> (arguments, text the error line must hold)
BAD_SPLITS = {
    "date-outside-cube": (["--split", "time:1990-01-01,2001-10-31"], "outside"),
    "periods-out-of-order": (["--split", "time:2001-10-31,2001-08-31"], "out of order"),
    "too-few-blocks": (["--split", "blocks:1000d,180deg"], "too few"),  # 2 blocks
    "empty-val-period": (["--split", "time:2001-12-20,2001-12-26"], "val part"),
    "buffer-eats-train-steps": (["--split", "time", "--buffer", "40"], "train part"),
    "buffer-eats-train-blocks": (["--buffer", "50"], "train part"),
    "unknown-kind": (["--split", "random"], "'random'"),
    "region-without-boxes": (["--split", "region"], "source and target"),
    "negative-buffer": (["--buffer", "-1"], "-1"),
}
COMMANDS = ("prepare", "run")


@pytest.fixture(scope="module", autouse=True)
def bad_runs(request, tmp_path_factory):
    """The CLI runs of the selected BAD_SPLITS cases, started in the background when this
    module starts (each costs seconds of imports and a prepare), overlapping with the tests
    above; the tiny cube is made once before they start."""
    selected = [
        (item.callspec.params["command"], item.callspec.params["case"])
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_split_is_one_line"
        and item.module is sys.modules[__name__]
    ]
    if selected:
        request.getfixturevalue("tiny")
    out = tmp_path_factory.mktemp("bad-split-runs")

    def run(command: str, case: str) -> tuple[subprocess.CompletedProcess, Path]:
        args, _ = BAD_SPLITS[case]
        results = out / f"{command}-{case}"
        extra = []
        if command == "run":
            extra = ["--cases", "sklearn-sgd", "--cases-dir", str(CASES_DIR)]
            extra += ["--no-tracking", "--out", str(results)]
        proc = run_cubebench(command, "--cube", "synthetic:tiny", *extra, *args, timeout=600)
        return proc, results

    with ThreadPoolExecutor(max_workers=1) as pool:
        yield {key: pool.submit(run, *key) for key in selected}


@pytest.mark.parametrize("case", list(BAD_SPLITS))
@pytest.mark.parametrize("command", COMMANDS)
def test_bad_split_is_one_line(bad_runs, command, case):
    """A split or buffer that cannot work: exit 2, one `cubebench: error:` line saying why, no
    traceback; `run` says it before any case starts and writes no result."""
    proc, results = bad_runs[(command, case)].result()
    where = f"\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, where
    assert proc.returncode == 2, f"exit code {proc.returncode}{where}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cubebench: error: "), where
    assert BAD_SPLITS[case][1].lower() in lines[0].lower(), where
    if command == "run":
        assert not results.exists() or not list(results.rglob("*.json")), where


def test_bad_split_premises(tiny):
    """What the bad cases rely on: 1000 days x 180 degrees is 2 blocks on tiny; no time step
    falls in 20..26 December 2001 while some are before and after; a time split's train ends
    within 40 steps of val, and train blocks of the default grid lie within 50 of val."""
    chunks = tiny["land_surface_temperature"].chunks
    assert grid_of(Split.parse("blocks:1000d,180deg"), tiny, chunks).shape == (1, 1, 2)
    time = tiny["time"].to_index()
    assert not ((time > "2001-12-20") & (time <= "2001-12-26")).any()
    assert (time <= "2001-12-20").any() and (time > "2001-12-26").any()
    assert len(time) == 46
    assert grid_of(Split(), tiny, chunks).shape == (8, 18, 36)  # every distance below 50
    with pytest.raises(TaskError, match="train part"):
        prepare_task(with_split(get_task("lst-from-t2m"), "time", 40), tiny)


def test_prepare_cli_takes_split_and_buffer(prepared, tiny):
    """Positive control: `prepare --split ... --buffer 1 --json` reports the split, parts and
    buffered blocks the library computes."""
    import json

    proc = run_cubebench(
        "prepare",
        "--cube",
        "synthetic:tiny",
        "--split",
        "blocks:4t,20deg",
        "--buffer",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    expected = prepared("blocks:4t,20deg", buffer=1).summary()
    assert summary["split"] == "blocks:4t,20deg buffer 1" == expected["split"]
    for key in ("samples", "blocks", "buffered", "fingerprint"):
        assert summary[key] == expected[key], key
