"""User mistakes at the command line: exit code 2, one `cubebench: error:` line, no traceback.

Every case runs the real CLI in a subprocess on an input it builds itself.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import cubebench
from run_cli import run_cubebench

SHAPE = (8, 6, 12)  # time, lat, lon
CHUNKS = (2, 6, 12)  # 4 blocks along time, every one with valid data
NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

# xarray writes consolidated metadata by default; zarr warns that v3 does not specify it yet
pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")


# --- helpers --------------------------------------------------------------------------------


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one stderr line `cubebench: error: ...`, no traceback; returns the line."""
    where = f"\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, where
    assert proc.returncode == 2, f"exit code {proc.returncode}{where}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}{where}"
    line = lines[0]
    assert line.startswith("cubebench: error: "), where
    assert len(line) > len("cubebench: error: ") + 5, f"no reason given{where}"
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


def grid_coords(lat_name: str = "lat", lon_name: str = "lon") -> dict:
    return {
        "time": pd.date_range("2001-01-01", periods=SHAPE[0], freq="8D"),
        lat_name: np.linspace(50.0, -50.0, SHAPE[1]),
        lon_name: np.linspace(-165.0, 165.0, SHAPE[2]),
    }


def field(seed: int, shape=SHAPE, offset: float = 280.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (offset + 10.0 * rng.standard_normal(shape)).astype(np.float32)


def write_zarr(ds: xr.Dataset, path: Path) -> Path:
    """As users write them: Zarr v3 with xarray's defaults (consolidated metadata included)."""
    ds.to_zarr(path, zarr_format=3, encoding={name: {"chunks": CHUNKS} for name in ds.data_vars})
    return path


def good_cube(path: Path) -> Path:
    dims = ("time", "lat", "lon")
    ds = xr.Dataset(
        {
            "air_temperature_2m": (dims, field(1), {"units": "K"}),
            "land_surface_temperature": (dims, field(2, offset=285.0), {"units": "K"}),
        },
        coords=grid_coords(),
    )
    return write_zarr(ds, path)


@pytest.fixture(scope="module")
def tiny_cached(cube_cache):
    """The tiny synthetic cube, generated once in-process before CLI subprocesses use it."""
    from cubebench.cube import make_cube

    return make_cube("tiny")


# --- the cube path --------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "no" / "such-cube.zarr"
    assert_user_error(run_cubebench("prepare", "--cube", str(missing)), str(missing))


def _traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


def test_permission_denied(tmp_path):
    as_root = os.geteuid() == 0
    base = tmp_path
    own_base = False
    if as_root and not _traversable_by_others(tmp_path):
        # /tmp/pytest-of-root is 0700: the unprivileged user could not even reach the cube
        base = Path(tempfile.mkdtemp(dir="/tmp", prefix="cubebench-perm-"))
        own_base = True
    try:
        base.chmod(0o755)
        cube = good_cube(base / "locked.zarr")
        env = dict(os.environ)
        prefix: tuple[str, ...] = ()  # not root: this user is the one refused
        if as_root:
            # root reads anything: run the CLI as an unprivileged user instead
            cache = base / "cache"
            cache.mkdir()
            cache.chmod(0o777)
            env |= {
                "CUBEBENCH_CACHE": str(cache),
                "HOME": str(cache),
                "PYTHONPATH": str(Path(cubebench.__file__).parents[1]),
            }
            prefix = SETPRIV
            # the control: the same user reads the cube while it is readable
            ok = run_cubebench(
                "prepare", "--cube", str(cube), "--json", env=env, prefix=prefix, cwd=base
            )
            assert ok.returncode == 0, f"uid {NOBODY} cannot prepare a readable cube:\n{ok.stderr}"
        cube.chmod(0o000)
        try:
            proc = run_cubebench("prepare", "--cube", str(cube), env=env, prefix=prefix, cwd=base)
        finally:
            cube.chmod(0o755)
        assert_user_error(proc, "permission")
    finally:
        if own_base:
            shutil.rmtree(base, ignore_errors=True)


def test_empty_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(
        run_cubebench("prepare", "--cube", str(empty)), str(empty), "not a zarr store"
    )


def test_directory_with_text_file(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("this is not a cube\n")
    assert_user_error(
        run_cubebench("prepare", "--cube", str(folder)), str(folder), "not a zarr store"
    )


def test_text_file(tmp_path):
    text = tmp_path / "foo.txt"
    text.write_text("time,lat,lon,lst\n")
    assert_user_error(run_cubebench("prepare", "--cube", str(text)), str(text), "not netcdf")


def test_garbage_with_netcdf_suffix(tmp_path):
    fake = tmp_path / "fake.nc"
    fake.write_bytes(b"definitely not HDF5\n" * 10)
    assert_user_error(run_cubebench("prepare", "--cube", str(fake)), str(fake))


# --- the cube's schema ----------------------------------------------------------------------


def test_variable_missing(tmp_path):
    ds = xr.Dataset(
        {"air_temperature_2m": (("time", "lat", "lon"), field(1), {"units": "K"})},
        coords=grid_coords(),
    )
    cube = write_zarr(ds, tmp_path / "t2m-only.zarr")
    line = assert_user_error(
        run_cubebench("prepare", "--cube", str(cube)), "land_surface_temperature"
    )
    assert "available: air_temperature_2m" in line


def test_run_stops_before_any_case_when_a_variable_is_missing(tmp_path):
    """The README's promise: a missing variable is one line and exit 2 before any case runs
    (not a suite of failed cases), and no run is left behind."""
    ds = xr.Dataset(
        {"air_temperature_2m": (("time", "lat", "lon"), field(1), {"units": "K"})},
        coords=grid_coords(),
    )
    cube = write_zarr(ds, tmp_path / "t2m-only.zarr")
    out = tmp_path / "results"
    proc = run_cubebench("run", "--cube", str(cube), "--out", str(out), "--no-tracking")
    assert_user_error(proc, "land_surface_temperature", "not in cube")
    assert not out.exists() or not any(out.iterdir())


def test_aliases_prepare(tmp_path):
    """Positive control: short names and long coordinate names are understood."""
    dims = ("time", "latitude", "longitude")
    ds = xr.Dataset(
        {
            "t2m": (dims, field(1), {"units": "K"}),
            "lst": (dims, field(2, offset=285.0), {"units": "K"}),
        },
        coords=grid_coords("latitude", "longitude"),
    )
    cube = write_zarr(ds, tmp_path / "short-names.zarr")
    # whole-chunk blocks: 4 chunks of 144 samples, so the parts' counts are known
    proc = run_cubebench("prepare", "--cube", str(cube), "--split", "chunks", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["samples"] == {"train": 288, "val": 144, "test": 144}
    assert sum(summary["blocks"].values()) == 4
    assert summary["chunk_shape"] == list(CHUNKS)


@pytest.mark.parametrize(
    "lst_dims",
    [("time", "lat"), ("lat", "lon", "time", "extra")],
    ids=["2d", "4d"],
)
def test_wrong_dims(tmp_path, lst_dims):
    sizes = {"time": SHAPE[0], "lat": SHAPE[1], "lon": SHAPE[2], "extra": 2}
    shape = tuple(sizes[d] for d in lst_dims)
    ds = xr.Dataset(
        {
            "air_temperature_2m": (("time", "lat", "lon"), field(1), {"units": "K"}),
            "land_surface_temperature": (lst_dims, field(2, shape), {"units": "K"}),
        },
        coords=grid_coords(),
    )
    cube = tmp_path / "wrong-dims.zarr"
    ds.to_zarr(cube, zarr_format=3)
    line = assert_user_error(
        run_cubebench("prepare", "--cube", str(cube)), "land_surface_temperature"
    )
    assert "dims" in line
    assert str(lst_dims) in line


def test_integer_dtype(tmp_path):
    ints = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) + 280
    ds = xr.Dataset(
        {
            "air_temperature_2m": (("time", "lat", "lon"), field(1), {"units": "K"}),
            "land_surface_temperature": (("time", "lat", "lon"), ints, {"units": "K"}),
        },
        coords=grid_coords(),
    )
    cube = write_zarr(ds, tmp_path / "int-lst.zarr")
    with xr.open_zarr(cube) as check:  # really stored, and opened, as an integer
        assert check["land_surface_temperature"].dtype == np.int16
        assert "scale_factor" not in check["land_surface_temperature"].encoding
    line = assert_user_error(
        run_cubebench("prepare", "--cube", str(cube)), "land_surface_temperature"
    )
    assert "dtype int16" in line


# --- bad options and empty selections on the tiny synthetic cube ---------------------------

OCEAN_BOX = "-1,1,-1,3"  # the Gulf of Guinea: one ocean cell (0N, 2E) of the 4-degree grid

# id -> (arguments after `prepare --cube synthetic:tiny`, text the error line must hold)
OPTION_CASES = {
    "region-text": (["--region", "north"], "'north'"),
    "region-empty-box": (["--region", "10,0"], "empty box"),
    "fractions-sum": (["--fractions", "0.5,0.5,0.5"], "fractions"),
    "fractions-text": (["--fractions", "a,b,c"], "'a,b,c'"),
    "time-text": (["--time", "2001-01-01"], "'2001-01-01'"),
    "time-not-a-date": (["--time", "foo,2001-12-31"], "foo"),
    "fractions-nan": (["--fractions", "nan,nan,nan"], "fractions"),
    "unknown-task": (["--task", "lst-from-nothing"], "unknown task 'lst-from-nothing'"),
    "unknown-preset": (["--cube", "synthetic:huge"], "'huge'"),
    "unknown-synthetic-option": (["--cube", "synthetic:tiny?foo=1"], "foo"),
    "storage-option-text": (["--storage-option", "anon"], "KEY=VALUE"),
    # a box of ocean only (negative numbers need `=`: argparse takes `-1,...` for an option)
    "region-ocean": ([f"--region={OCEAN_BOX}"], "no valid samples"),
    "region-between-cell-centres": (["--region", "0,1,0,1"], "no valid samples"),
    "time-outside-cube": (["--time", "1990-01-01,1990-12-31"], "no valid samples"),
}


@pytest.fixture(scope="module", autouse=True)
def option_runs(request):
    """The CLI runs of the selected OPTION_CASES, started in the background when this module
    starts: each costs ~1 s of imports on one core, and they overlap with the tests below that
    build their own input. One test per case checks its run."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_option"
        and item.module is sys.modules[__name__]
    ]
    if selected:
        request.getfixturevalue("tiny_cached")  # generated once, before the subprocesses

    def run(args: list[str]) -> subprocess.CompletedProcess:
        base = [] if "--cube" in args else ["--cube", "synthetic:tiny"]
        return run_cubebench("prepare", *base, *args)

    with ThreadPoolExecutor(max_workers=1) as pool:
        yield {case: pool.submit(run, OPTION_CASES[case][0]) for case in selected}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_option(option_runs, case):
    _, needle = OPTION_CASES[case]
    assert_user_error(option_runs[case].result(), needle)


def test_empty_selection_premises(tiny_cached):
    """The premise of the region-ocean case: the box holds a cell, and its LST is all NaN."""
    from cubebench.cube import open_cube
    from cubebench.task import Box

    box = Box.parse(OCEAN_BOX)
    tiny = open_cube(str(tiny_cached))
    lst = tiny["land_surface_temperature"].isel(
        lat=box.lat_mask(tiny["lat"].values), lon=box.lon_mask(tiny["lon"].values)
    )
    assert lst.sizes["lat"] == lst.sizes["lon"] == 1
    assert not np.isfinite(lst.values).any()
    # and of the region-between-cell-centres case: 0..1 E holds no longitude of the grid
    assert not Box.parse("0,1,0,1").lon_mask(tiny["lon"].values).any()


def test_make_cube_refuses_existing_output(tmp_path):
    out = tmp_path / "mine.zarr"
    out.mkdir()
    marker = out / "keep-me.txt"
    marker.write_text("precious")
    proc = run_cubebench("make-cube", "--preset", "tiny", "--output", str(out))
    assert_user_error(proc, str(out), "--force")
    assert marker.read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["keep-me.txt"]


def test_make_cube_output_below_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "cube.zarr"
    assert_user_error(
        run_cubebench("make-cube", "--preset", "tiny", "--output", str(out)), str(blocker)
    )
    assert blocker.read_text() == "not a directory"


def test_make_cube_force_over_a_file(tmp_path):
    """--force over a plain file: either a cube replaces it (exit 0) or a one-line refusal."""
    out = tmp_path / "cube.zarr"
    out.write_text("a file, not a store")
    proc = run_cubebench("make-cube", "--preset", "tiny", "--output", str(out), "--force")
    if proc.returncode == 0:
        assert (out / "zarr.json").is_file(), proc.stdout
    else:
        assert_user_error(proc, str(out))
        assert out.read_text() == "a file, not a store"


def test_run_stops_before_any_case_when_a_split_part_would_be_empty(tmp_path, tiny_cached):
    """One chunk holds the whole cube: whole-chunk blocks give no train/val/test split. `run`
    says so once, before any case starts, and leaves no run behind."""
    cube = tmp_path / "one-chunk.zarr"
    made = run_cubebench(
        "make-cube", "--preset", "tiny", "--chunks", "46,45,90", "--output", str(cube)
    )
    assert made.returncode == 0, made.stderr
    out = tmp_path / "results"
    proc = run_cubebench(
        "run", "--cube", str(cube), "--split", "chunks", "--out", str(out), "--no-tracking"
    )
    assert_user_error(proc, "task lst-from-t2m", "too few")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("damage", ["broken-json", "unknown-codec"])
def test_unreadable_metadata(tmp_path, damage):
    """A store whose metadata zarr rejects: one line naming the store, no traceback."""
    cube = good_cube(tmp_path / "cube.zarr")
    meta = cube / "land_surface_temperature" / "zarr.json"
    if damage == "broken-json":
        meta.write_text(meta.read_text()[:-20])
    else:
        text = json.loads(meta.read_text())
        text["codecs"].append({"name": "no-such-codec", "configuration": {}})
        meta.write_text(json.dumps(text))
    for consolidated in (cube / "zarr.json",):  # the consolidated copy must not hide it
        root = json.loads(consolidated.read_text())
        root.pop("consolidated_metadata", None)
        consolidated.write_text(json.dumps(root))
    assert_user_error(run_cubebench("prepare", "--cube", str(cube)), str(cube))
