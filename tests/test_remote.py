"""Remote cubes read through a real S3 API: a moto server process on 127.0.0.1."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import xarray as xr
from benchmarks.scripts.remote_vs_local import moto_server

from cubebench.cube import cube_fingerprint, make_cube, open_cube
from cubebench.errors import CubeError
from cubebench.task import get_task, prepare_task
from loopback import free_port
from run_cli import run_cubebench

pytestmark = pytest.mark.server

BUCKET = "bucket"
KEY = SECRET = "testing"  # moto_server's fake credentials


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server process (the one benchmarks/scripts/remote_vs_local.py measures
    against), with fake credentials in the environment; yields its endpoint URL."""
    with moto_server(tmp_path_factory.mktemp("moto") / "server.log") as url:
        yield url


@pytest.fixture(scope="session")
def s3(s3_server, cube_cache, tmp_path_factory):
    """A bucket holding the tiny synthetic cube as Zarr (tiny.zarr) and as NetCDF (tiny.nc)."""
    import s3fs

    options = {"endpoint_url": s3_server, "key": KEY, "secret": SECRET}
    fs = s3fs.S3FileSystem(
        key=KEY, secret=SECRET, client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True
    )
    fs.mkdir(BUCKET)
    local = make_cube("tiny")
    fs.put(str(local), f"{BUCKET}/tiny.zarr", recursive=True)
    assert fs.exists(f"{BUCKET}/tiny.zarr/zarr.json")
    assert fs.exists(f"{BUCKET}/tiny.zarr/land_surface_temperature/zarr.json")

    nc = tmp_path_factory.mktemp("netcdf") / "tiny.nc"
    with xr.open_zarr(local, consolidated=False) as ds:
        ds.drop_encoding().to_netcdf(nc, engine="h5netcdf")
    fs.put(str(nc), f"{BUCKET}/tiny.nc")
    return {"options": options, "fs": fs}


def assert_same_values(remote: xr.Dataset, local: xr.Dataset) -> None:
    assert sorted(remote.data_vars) == sorted(local.data_vars)
    assert dict(remote.sizes) == dict(local.sizes)
    for name in [*local.coords, *local.data_vars]:
        assert remote[name].dtype == local[name].dtype, name
        # NaNs (ocean, clouds) must sit at the same places
        np.testing.assert_array_equal(remote[name].values, local[name].values, err_msg=name)
    assert np.isnan(local["land_surface_temperature"].values).any()  # the NaN check did work


@pytest.fixture(scope="module")
def remote_zarr(s3):
    """The cube opened from S3, its chunks read once (moto answers ~100 requests a second)."""
    ds = open_cube(f"s3://{BUCKET}/tiny.zarr", storage_options=s3["options"])
    assert ds.attrs["cubebench_source"] == f"s3://{BUCKET}/tiny.zarr"
    return ds.persist()


def test_zarr_over_s3_equals_local(remote_zarr, tiny):
    assert_same_values(remote_zarr, tiny)
    assert {n: v.chunks for n, v in remote_zarr.data_vars.items()} == {
        n: v.chunks for n, v in tiny.data_vars.items()
    }
    assert cube_fingerprint(remote_zarr) == cube_fingerprint(tiny)


def test_prepare_over_s3_equals_local(remote_zarr, tiny_task):
    task = prepare_task(get_task("lst-from-t2m"), remote_zarr)
    got, want = task.summary(), tiny_task.summary()
    assert got["samples"] == want["samples"]
    assert sum(got["samples"].values()) > 0
    assert got["blocks"] == want["blocks"]
    for part in want["blocks"]:
        np.testing.assert_array_equal(task.blocks[part], tiny_task.blocks[part])
    np.testing.assert_allclose(task.feature_mean, tiny_task.feature_mean, rtol=1e-12)
    np.testing.assert_allclose(task.feature_std, tiny_task.feature_std, rtol=1e-12)
    assert task.target_mean == pytest.approx(tiny_task.target_mean, rel=1e-12)
    assert task.target_std == pytest.approx(tiny_task.target_std, rel=1e-12)
    assert task.fingerprint == tiny_task.fingerprint


def _storage_args(s3) -> list[str]:
    args = []
    for key, value in s3["options"].items():
        args += ["--storage-option", f"{key}={value}"]
    return args


def test_cli_prepare_over_s3(s3, tiny_task):
    proc = run_cubebench(
        "prepare", "--cube", f"s3://{BUCKET}/tiny.zarr", *_storage_args(s3), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["fingerprint"] == tiny_task.fingerprint
    assert summary["samples"] == tiny_task.summary()["samples"]
    assert summary["cube"] == f"s3://{BUCKET}/tiny.zarr"


def test_cli_rechunks_a_cube_from_s3(s3, tmp_path):
    """`rechunk` reads SRC over S3 on a dask cluster: the copy has the new chunks and the local
    cube's values; the workers close their S3 sessions (none "Unclosed" at their exit)."""
    import zarr

    dst = tmp_path / "map.zarr"
    proc = run_cubebench(
        *("rechunk", f"s3://{BUCKET}/tiny.zarr", str(dst), "--layout", "map"),
        *("--dask-scheduler", "local:1", *_storage_args(s3), "--json"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "Unclosed" not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)["chunks"] == [1, 45, 90]
    local, copy = zarr.open_group(make_cube("tiny"), mode="r"), zarr.open_group(dst, mode="r")
    assert copy["land_surface_temperature"].chunks == (1, 45, 90)
    for name, array in local.arrays():
        np.testing.assert_array_equal(copy[name][:], array[:], err_msg=name)


def test_cli_missing_remote_cube(s3):
    proc = run_cubebench("prepare", "--cube", f"s3://{BUCKET}/nope.zarr", *_storage_args(s3))
    where = f"\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, where
    assert proc.returncode == 2, where
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, where
    assert lines[0].startswith("cubebench: error: "), where
    assert f"s3://{BUCKET}/nope.zarr" in lines[0]


@pytest.mark.parametrize(
    "url",
    [f"s3://{BUCKET}/nope.zarr", f"s3://{BUCKET}/nope.nc", "s3://no-such-bucket/tiny.zarr"],
)
def test_open_missing_remote_cube(s3, url):
    with pytest.raises(CubeError, match="cannot open remote cube"):
        open_cube(url, storage_options=s3["options"])


def test_open_remote_garbage_netcdf(s3):
    s3["fs"].pipe(f"{BUCKET}/garbage.nc", b"not HDF5 at all\n" * 64)
    with pytest.raises(CubeError, match=re.escape(f"s3://{BUCKET}/garbage.nc")):
        open_cube(f"s3://{BUCKET}/garbage.nc", storage_options=s3["options"])


def test_open_remote_unknown_storage_option(s3):
    """`--storage-option bogus=1` is the user's mistake, not a crash."""
    with pytest.raises(CubeError):
        open_cube(f"s3://{BUCKET}/tiny.zarr", storage_options=s3["options"] | {"bogus": 1})


def test_open_remote_unreachable_endpoint(s3):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    options = s3["options"] | {
        "endpoint_url": closed,
        "config_kwargs": {"retries": {"max_attempts": 1}},  # fail fast
    }
    with pytest.raises(CubeError, match=re.escape(f"s3://{BUCKET}/tiny.zarr")):
        open_cube(f"s3://{BUCKET}/tiny.zarr", storage_options=options)


def test_netcdf_over_s3_equals_local(s3, tiny):
    remote = open_cube(f"s3://{BUCKET}/tiny.nc", storage_options=s3["options"])
    assert_same_values(remote, tiny)
    # contiguous NetCDF variables are chunked so that blocks can be formed
    assert all(len(c) > 1 for c in remote["land_surface_temperature"].chunks)
    task = prepare_task(get_task("lst-from-t2m"), remote)
    valid = np.isfinite(tiny["land_surface_temperature"].values) & np.isfinite(
        tiny["air_temperature_2m"].values
    )
    assert sum(task.samples.values()) == int(valid.sum()) > 0


def test_stream_over_s3_delivers_every_sample_once(s3, tiny_task):
    """The loader reads chunks straight from the S3 API (zarr-python through fsspec)."""
    from cubebench.loading import ChunkStream, available_readers

    remote = open_cube(f"s3://{BUCKET}/tiny.zarr", storage_options=s3["options"])
    assert available_readers(remote) == ["zarr", "xarray"]
    task = prepare_task(get_task("lst-from-t2m"), remote)
    stream = ChunkStream(task, "val", batch_size=1000, storage_options=s3["options"])
    assert stream.reader.name == "zarr"
    ys = np.concatenate([y for _, y in stream.batches(0)])
    local = ChunkStream(tiny_task, "val", batch_size=1000)
    expected = np.concatenate([y for _, y in local.batches(0)])
    np.testing.assert_array_equal(np.sort(ys), np.sort(expected))
    assert stream.stats.chunks_decoded == len(local.chunks)
    assert stream.stats.bytes_read == local.stats.bytes_read > 0  # same compressed chunks


def test_bench_loader_over_s3_counts_what_it_counts_locally(s3, remote_zarr, tiny_task):
    """bench_loader on the S3 cube: the same samples, chunks and stored bytes as on the local
    cube (only the time differs)."""
    from cubebench.loading.bench import bench_loader

    task = prepare_task(get_task("lst-from-t2m"), remote_zarr)  # chunks in memory: no reads
    settings = {"part": "val", "batch_size": 1000, "threads": 2, "epochs": 1, "max_seconds": 0}
    remote = bench_loader(task, storage_options=s3["options"], **settings)  # reads over S3
    local = bench_loader(tiny_task, **settings)
    assert remote["reader"] == remote["raw_reader"] == "zarr"
    assert remote["cube"] == f"s3://{BUCKET}/tiny.zarr"
    keys = ("pairs", "expected_pairs", "chunks_decoded", "bytes_read", "bytes_decoded")
    for key in (*keys, "read_amplification"):
        assert remote[key] == local[key], key
    assert remote["pairs"] == tiny_task.samples["val"] > 0
    # val shares its chunks with train and test on the default (physical) split
    assert remote["bytes_read"] > 0 and remote["read_amplification"] > 1
    assert remote["pairs_per_s"] > 0
