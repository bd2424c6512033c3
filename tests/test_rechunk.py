"""`cubebench rechunk`: a copy with other chunks and the same stored bytes, made on a real dask
cluster (peer-to-peer rechunk), written atomically."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from cubebench.cube import make_cube, open_cube
from cubebench.cube.rechunk import rechunk_cube
from cubebench.errors import ChunkReadError, CubeError
from cubebench.task import get_task, prepare_task
from run_cli import run_cubebench

TINY = (46, 45, 90)
CUBE_VARS = ("air_temperature_2m", "land_surface_temperature", "root_moisture")

# xarray writes consolidated metadata by default; zarr warns that v3 does not specify it yet
pytestmark = [
    pytest.mark.server,  # dask LocalClusters
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Failed to open Zarr store with consolidated"),
]


@pytest.fixture(scope="module")
def scheduler():
    """One LocalCluster of worker processes for the module: each rechunk connects to it."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    ) as cluster:
        yield cluster.scheduler_address


def metadata_without_chunks(array: zarr.Array) -> dict:
    meta = array.metadata.to_dict()
    meta.pop("chunk_grid", None)  # v3
    meta.pop("chunks", None)  # v2
    return meta


def assert_same_stored_cube(src: Path, dst: Path, chunks: dict[str, tuple[int, ...]]) -> None:
    """Every array: same bytes, same metadata but for the chunks, which are `chunks` (name ->
    shape) or the source's."""
    a, b = zarr.open_group(src, mode="r"), zarr.open_group(dst, mode="r")
    assert a.metadata.zarr_format == b.metadata.zarr_format
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name, x in a.arrays():
        y = b[name]
        assert isinstance(y, zarr.Array)
        assert y.chunks == chunks.get(name, x.chunks), name
        assert metadata_without_chunks(y) == metadata_without_chunks(x), name
        raw_x, raw_y = x[...], y[...]
        assert raw_x.dtype == raw_y.dtype
        assert raw_x.tobytes() == raw_y.tobytes(), f"{name}: stored values differ"
    attrs_a, attrs_b = dict(a.attrs), dict(b.attrs)
    if "cubebench_layout" in attrs_a:
        attrs_a.pop("cubebench_layout"), attrs_b.pop("cubebench_layout")
    assert attrs_a == attrs_b
    consolidated = (a.metadata.consolidated_metadata, b.metadata.consolidated_metadata)
    assert (consolidated[0] is None) == (consolidated[1] is None)


def assert_same_decoded(src: Path, dst: Path) -> None:
    a, b = xr.open_zarr(src, consolidated=None), xr.open_zarr(dst, consolidated=None)
    a.attrs.pop("cubebench_layout", None), b.attrs.pop("cubebench_layout", None)
    a, b = a.load(), b.load()
    xr.testing.assert_identical(a, b)  # values (NaN where NaN), coords, attrs
    for name in a.variables:
        keep = ("dtype", "_FillValue", "scale_factor", "add_offset", "units", "calendar")
        enc_a = {k: v for k, v in a[name].encoding.items() if k in keep}
        enc_b = {k: v for k, v in b[name].encoding.items() if k in keep}
        assert str(enc_a) == str(enc_b), name  # str: NaN fill values compare equal
        if a[name].dtype.kind == "f":
            assert np.array_equal(np.isnan(a[name].values), np.isnan(b[name].values))


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_rechunked_copy_is_bit_identical(tmp_path, scheduler, zarr_format):
    src = make_cube("tiny", layout="ts", zarr_format=zarr_format)
    dst = tmp_path / "map.zarr"
    result = rechunk_cube(str(src), dst, "map", scheduler=scheduler)
    assert result.dst == dst and result.chunks == (1, 45, 90)
    assert sorted(result.variables) == sorted(CUBE_VARS)
    assert_same_stored_cube(src, dst, dict.fromkeys(CUBE_VARS, (1, 45, 90)))
    assert_same_decoded(src, dst)
    assert zarr.open_group(dst, mode="r").attrs["cubebench_layout"] == "map"
    assert zarr.open_group(dst, mode="r").metadata.consolidated_metadata is not None
    lst = zarr.open_group(dst, mode="r")["land_surface_temperature"][...]
    assert np.isnan(lst).any() and np.isfinite(lst).any()  # gaps and values both copied


def test_packed_user_cube_keeps_its_encoding(tmp_path, scheduler):
    """int16 with scale_factor/add_offset/_FillValue, aliased dims, consolidated Zarr v3,
    a 2-D mask and an explicit `t,y,x`: stored integers copied, only cube chunks change."""
    rng = np.random.default_rng(0)
    shape = (8, 6, 12)
    values = (280 + 10 * rng.standard_normal(shape)).astype(np.float32)
    values[0, :2, :3] = np.nan
    ds = xr.Dataset(
        {
            "t2m": (("time", "latitude", "longitude"), values, {"units": "K"}),
            "mask": (("latitude", "longitude"), rng.integers(0, 2, shape[1:]).astype("u1")),
        },
        coords={
            "time": np.arange(shape[0]).astype("datetime64[D]"),
            "latitude": np.linspace(50, -50, shape[1]),
            "longitude": np.linspace(-165, 165, shape[2]),
        },
        attrs={"title": "packed"},
    )
    src = tmp_path / "packed.zarr"
    packing = {"dtype": "int16", "scale_factor": 0.01, "add_offset": 280.0, "_FillValue": -32768}
    ds.to_zarr(
        src,
        zarr_format=3,
        encoding={"t2m": {**packing, "chunks": (8, 3, 3)}, "mask": {"chunks": (3, 4)}},
    )
    dst = tmp_path / "copy.zarr"
    rechunk_cube(str(src), dst, "2,6,99", scheduler=scheduler)  # longer than the axis: all of it
    assert_same_stored_cube(src, dst, {"t2m": (2, 6, 12)})
    assert_same_decoded(src, dst)
    stored = zarr.open_group(dst, mode="r")["t2m"]
    assert stored.dtype == np.int16 and stored.attrs["_FillValue"] == -32768
    assert stored.attrs["scale_factor"] == 0.01 and stored.attrs["add_offset"] == 280.0


def test_prepared_task_is_the_same_on_the_copy(tmp_path, scheduler):
    """Blocks follow chunks, so the split differs; what cannot differ is the data: the total
    of valid samples and the mean of every feature and the target over all of them. (DST
    exists: --force replaces it.)"""
    src = make_cube("tiny", layout="ts")
    dst = tmp_path / "balanced.zarr"
    dst.mkdir()
    (dst / "stale").write_text("an older copy")
    rechunk_cube(str(src), dst, "balanced", scheduler=scheduler, force=True)
    assert not (dst / "stale").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["balanced.zarr"]  # the old one is gone
    spec = get_task("lst-from-t2m")
    before, after = (prepare_task(spec, open_cube(str(p))) for p in (src, dst))
    assert after.chunk_shape == (12, 12, 23) and before.chunk_shape == (46, 12, 12)
    assert sum(before.samples.values()) == sum(after.samples.values()) > 0

    def everything(task):
        parts = [task.load_part(p) for p in task.spec.parts]
        return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])

    (xb, yb), (xa, ya) = everything(before), everything(after)
    np.testing.assert_allclose(xa.mean(axis=0), xb.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(ya.mean(), yb.mean(), rtol=1e-9)
    np.testing.assert_array_equal(np.sort(ya), np.sort(yb))


def test_cli_writes_one_json_line_and_refuses_to_overwrite(tmp_path, scheduler, capsys):
    from cubebench.cli import main

    dst = tmp_path / "out.zarr"
    args = ("rechunk", "synthetic:tiny?layout=ts", str(dst), "--dask-scheduler", scheduler)
    proc = run_cubebench(*args, "--layout", "map", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["dst"] == str(dst) and info["chunks"] == [1, 45, 90] and info["seconds"] > 0
    assert info["peak_worker_rss_mb"] >= info["baseline_worker_rss_mb"] > 0
    before = {p: p.stat().st_mtime_ns for p in dst.rglob("*")}

    assert main([*args, "--layout", "balanced"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "pass --force" in lines[0], lines
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*")} == before  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.zarr"]  # no temporaries left


@pytest.mark.parametrize(
    ("src", "layout", "needle"),
    [
        ("synthetic:tiny", "diagonal", "unknown layout"),
        ("synthetic:tiny", "1,0,4", "positive integers"),
        ("{tmp}/missing.zarr", "map", "not found"),
        ("{tmp}", "map", "not a Zarr store"),
        ("{tmp}/o.zarr", "map", "overlaps the source"),
    ],
)
def test_cli_user_errors_exit_2_before_any_work(tmp_path, capsys, src, layout, needle):
    from cubebench.cli import main

    dst = tmp_path / "o.zarr"
    if src == "{tmp}/o.zarr":  # SRC = DST, with --force
        make_cube("tiny", output=dst)
    code = main(["rechunk", src.format(tmp=tmp_path), str(dst), "--layout", layout, "--force"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cubebench: error: "), lines
    assert needle.lower() in lines[0].lower(), lines
    assert not list(tmp_path.glob(".o.zarr*"))


def test_a_store_without_cube_variables_is_refused(tmp_path):
    src = tmp_path / "flat.zarr"
    xr.Dataset({"v": ("x", np.arange(3.0))}).to_zarr(src, zarr_format=3)
    with pytest.raises(CubeError, match="no variable with dims"):
        rechunk_cube(str(src), tmp_path / "o.zarr", "map")


def test_netcdf_source_and_remote_destination_are_refused(tmp_path):
    nc = tmp_path / "cube.nc"
    with xr.open_zarr(make_cube("tiny"), consolidated=False) as ds:
        ds.isel(time=slice(0, 2)).drop_encoding().to_netcdf(nc, engine="h5netcdf")
    with pytest.raises(CubeError, match="rechunk reads Zarr cubes"):
        rechunk_cube(str(nc), tmp_path / "o.zarr", "map")
    with pytest.raises(CubeError, match="local path"):
        rechunk_cube("synthetic:tiny", "s3://bucket/copy.zarr", "map")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.nc"]


def corrupt_copy(tmp_path: Path) -> Path:
    """The tiny ts cube with one chunk of LST overwritten by garbage."""
    src = tmp_path / "corrupt.zarr"
    shutil.copytree(make_cube("tiny", layout="ts"), src)
    chunks = (src / "land_surface_temperature").rglob("*")
    chunk = next(p for p in chunks if p.is_file() and p.parent.name == "1")
    chunk.write_bytes(b"not a blosc frame" * 8)
    return src


def test_failed_rechunk_leaves_the_destination_as_it_was(tmp_path, scheduler):
    """A chunk that cannot be decoded: a one-line error naming it; the DST that --force would
    have replaced is intact and no temporary is left beside it."""
    src = corrupt_copy(tmp_path)
    out = tmp_path / "out"
    existing = out / "old.zarr"
    shutil.copytree(make_cube("tiny", layout="ts"), existing)
    before = {p: p.stat().st_mtime_ns for p in existing.rglob("*")}
    with pytest.raises(ChunkReadError, match="'land_surface_temperature' chunk c/0/1/"):
        rechunk_cube(str(src), existing, "balanced", scheduler=scheduler, force=True)
    assert {p: p.stat().st_mtime_ns for p in existing.rglob("*")} == before
    assert [p.name for p in out.iterdir()] == ["old.zarr"]


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background job"])
def test_interrupted_rechunk_leaves_no_destination(tmp_path, background):
    """SIGINT while the copy is being made (here: its cluster starting): exit 130, nothing
    left at DST or beside it; also when started as a background job, which inherits SIGINT
    ignored (a script's `cmd &`, a CI harness) and Python would leave it so."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["synthetic:tiny?layout=ts", str(out / "new.zarr"), "--layout", "map"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cubebench", "rechunk", *args, "--dask-scheduler", "local:1"],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None,
    )
    deadline = time.monotonic() + 60
    while not any(out.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert list(out.iterdir()) == [], stderr
