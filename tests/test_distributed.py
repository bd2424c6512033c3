"""`--dask-scheduler`: preparation and generation on real dask clusters give the same results.

An external `dask scheduler` with one `dask worker` process (two single-threaded workers) is
started on 127.0.0.1 once for the module; LocalClusters start and stop inside the commands.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from cubebench import cli, cluster
from cubebench.errors import CubebenchError
from cubebench.task import PARTS, get_task, prepare_task
from loopback import free_port
from run_cli import run_cubebench

pytestmark = pytest.mark.server

WORKERS = 2


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL to the process group it leads (a worker's nanny has children)."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, 9)  # its own session: only what this fixture started
    proc.wait()


@pytest.fixture(scope="module")
def scheduler_address(cube_cache, tmp_path_factory):
    """A `dask scheduler` and a `dask worker --nworkers 2 --nthreads 1`, as real processes."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path_factory.mktemp("dask")
    procs = []

    def start(name: str, *args: str) -> None:
        with (logs / f"{name}.log").open("w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", f"distributed.cli.dask_{name}", *args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=logs,  # the worker's scratch space goes there
                )
            )

    try:
        start("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
        start(
            "worker",
            address,
            "--nworkers",
            str(WORKERS),
            "--nthreads",
            "1",
            "--no-dashboard",
            "--host",
            "127.0.0.1",
        )
        try:
            with Client(address, timeout=30) as client:
                client.wait_for_workers(WORKERS, timeout=60)
        except Exception as exc:
            text = "\n".join(f"{p.name}:\n{p.read_text()}" for p in logs.glob("*.log"))
            raise RuntimeError(f"the dask cluster did not start: {exc}\n{text}") from None
        yield address
    finally:
        for proc in reversed(procs):  # workers first: they would wait for their scheduler
            _stop(proc)


@pytest.fixture(scope="module")
def reference_cube(tiny) -> Path:
    """The tiny cube as one process wrote it (dask's threads, into the session's cache): what
    every cluster must match."""
    return Path(tiny.attrs["cubebench_store"])


def assert_bit_identical(got: Path, want: Path) -> None:
    """The same files with the same bytes (compressed chunks, metadata), and the same values,
    NaN payloads included, in every variable and coordinate."""
    files = sorted(p.relative_to(want) for p in want.rglob("*") if p.is_file())
    assert sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file()) == files
    for rel in files:
        assert (got / rel).read_bytes() == (want / rel).read_bytes(), rel
    with (
        xr.open_zarr(got, consolidated=False) as a,
        xr.open_zarr(want, consolidated=False) as b,
    ):
        assert sorted(a.variables) == sorted(b.variables)
        assert a.attrs == b.attrs
        for name in b.variables:
            x, y = a[name].values, b[name].values
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(
                x.view(f"u{x.dtype.itemsize}") if x.dtype.kind == "f" else x,
                y.view(f"u{y.dtype.itemsize}") if y.dtype.kind == "f" else y,
                err_msg=name,
            )
        assert np.isnan(b["land_surface_temperature"].values).any()  # NaNs were compared


def test_prepare_on_an_external_scheduler_equals_single_process(scheduler_address, tiny_task, tiny):
    distributed = prepare_task(get_task("lst-from-t2m"), tiny, scheduler=scheduler_address)
    for part in PARTS:
        np.testing.assert_array_equal(distributed.blocks[part], tiny_task.blocks[part])
    assert distributed.samples == tiny_task.samples
    assert sum(distributed.samples.values()) > 0
    np.testing.assert_allclose(distributed.feature_mean, tiny_task.feature_mean, rtol=1e-12)
    np.testing.assert_allclose(distributed.feature_std, tiny_task.feature_std, rtol=1e-12)
    assert distributed.target_mean == pytest.approx(tiny_task.target_mean, rel=1e-12)
    assert distributed.target_std == pytest.approx(tiny_task.target_std, rel=1e-12)
    assert distributed.fingerprint == tiny_task.fingerprint


def test_make_cube_on_an_external_scheduler_is_bit_identical(
    scheduler_address, reference_cube, tmp_path
):
    """`cubebench make-cube --dask-scheduler ADDRESS`, run in this process (the CLI's code
    path without paying its imports again): the workers write the chunks."""
    out = tmp_path / "tiny.zarr"
    args = ["--preset", "tiny", "--output", str(out), "--dask-scheduler", scheduler_address]
    assert cli.main(["make-cube", *args]) == 0
    assert_bit_identical(out, reference_cube)


def test_make_cube_cli_on_a_local_cluster_is_bit_identical(reference_cube, tmp_path):
    """A real `cubebench` process that starts a LocalCluster (spawned worker processes)."""
    out = tmp_path / "tiny.zarr"
    proc = run_cubebench(
        "make-cube", "--preset", "tiny", "--output", str(out), "--dask-scheduler", "local:2"
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert_bit_identical(out, reference_cube)


def test_unreachable_scheduler_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 0.5)
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    started = time.monotonic()
    with (
        pytest.raises(CubebenchError, match="cannot reach the dask scheduler"),
        cluster.dask_client(address),
    ):
        pass
    assert time.monotonic() - started < 10
    out = tmp_path / "never.zarr"
    code = cli.main(
        ["make-cube", "--preset", "tiny", "--output", str(out), "--dask-scheduler", address]
    )
    err = capsys.readouterr().err
    assert code == cli.EXIT_USER_ERROR
    assert err.startswith("cubebench: error: cannot reach the dask scheduler"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert address in err
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no half-written temporary left behind


def test_a_server_that_is_not_a_scheduler_fails_within_the_deadline(monkeypatch):
    """distributed alone waits forever for the handshake of a server that never answers."""
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 0.5)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts connections (the kernel does), never says a word
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(CubebenchError, match="no dask answer"), cluster.dask_client(address):
            pass
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("scheduler", ["local:0", "local:two"])
def test_bad_local_worker_count_is_a_one_line_error(scheduler, capsys, tmp_path):
    out = tmp_path / "never.zarr"
    code = cli.main(
        ["make-cube", "--preset", "tiny", "--output", str(out), "--dask-scheduler", scheduler]
    )
    err = capsys.readouterr().err
    assert code == cli.EXIT_USER_ERROR
    assert err.startswith("cubebench: error: ") and len(err.splitlines()) == 1, err
    assert "local:N needs N >= 1" in err
    assert not out.exists()
