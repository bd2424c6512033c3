"""The CPU image, end to end on a real Docker engine: built offline from the debootstrap base
and the wheelhouse, `nox -s bench-cpu` runs the whole suite in it, results and mlflow runs
land on the host, the image matches its lock, runs as non-root, and reruns give the same
numbers. The CUDA locks are checked in tests/test_locks.py (no GPU here to run them).

The engine comes from `images/ensure-docker.sh`, which the `tests` nox session runs first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cubebench import results
from cubebench.discovery import discover

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3900)]

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "cubebench-cpu:latest"
BASE = "cubebench/base:bookworm-py3.11"
NOX = (sys.executable, "-m", "nox", "--no-error-on-external-run")


def _nox(*args: str, env: dict | None = None, timeout: float = 1800):
    proc = subprocess.run(
        [*NOX, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _docker(*args: str) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _in_image(program: str, *args: str) -> str:
    return _docker("run", "--rm", "--network", "none", "--entrypoint", program, IMAGE, *args)


def _lock_hash() -> str:
    sys.path.insert(0, str(ROOT))
    try:
        from noxfile import lock_hash
    finally:
        sys.path.remove(str(ROOT))
    return lock_hash("cpu")


@pytest.fixture(scope="module")
def image():
    """The base image (debootstrap) and the CPU image, built by their nox sessions."""
    if subprocess.run(["docker", "image", "inspect", BASE], capture_output=True).returncode:
        _nox("-s", "base-image")
    _nox("-s", "image-cpu")
    return _docker("image", "inspect", "--format", "{{.Id}}", IMAGE)


@pytest.fixture(scope="module")
def suite_run(image, tmp_path_factory):
    """`nox -s bench-cpu -- --cube synthetic:tiny --epochs 2`: every case, in the container."""
    out = tmp_path_factory.mktemp("docker-results")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = ["--cube", "synthetic:tiny", "--epochs", "2", "--run-id", "in-docker"]
    proc = subprocess.run(
        [*NOX, "-s", "bench-cpu", "--", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**env, "CUBEBENCH_RESULTS": str(out)},
        timeout=1800,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def test_the_suite_runs_in_the_image_and_results_land_on_the_host(image, suite_run):
    manifest, found = results.load_run(suite_run / "in-docker")
    assert manifest["status"] == "finished"
    assert {r["case"] for r in found} == set(discover(ROOT / "cases"))  # every case
    assert all(r["status"] == "ok" for r in found), [(r["case"], r["reason"]) for r in found]
    for result in found:  # every result records the image and its lock
        assert result["environment"]["image"] == {"digest": image, "lock_hash": _lock_hash()}
        assert result["environment"]["git_sha"]
    assert (suite_run / "in-docker" / "report.md").exists()
    # mlflow's sqlite store in the host's results dir holds every case, complete
    client = MlflowClient(f"sqlite:///{suite_run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cubebench")
    runs = client.search_runs([experiment.experiment_id], "tags.`cubebench.role` = 'case'")
    assert sorted(r.data.tags["cubebench.case"] for r in runs) == sorted(r["case"] for r in found)
    assert all(r.data.tags["cubebench.complete"] == "true" for r in runs)


def test_the_image_matches_its_lock_runs_as_non_root_and_is_labelled(image):
    freeze = _in_image("pip", "freeze", "--all", "--exclude", "cubebench")
    lock = (ROOT / "images/cpu/requirements.lock").read_text()

    def pins(text: str) -> set[str]:
        return {line.strip() for line in text.splitlines() if line and not line.startswith("#")}

    assert pins(freeze) == pins(lock)  # two builds from one lock: the same packages
    assert _in_image("id", "-u") == "1000"
    labels = json.loads(_docker("image", "inspect", "--format", "{{json .Config.Labels}}", IMAGE))
    assert labels["io.cubebench.lock-hash"] == _lock_hash()
    assert labels["io.cubebench.flavour"] == "cpu"
    assert labels["org.opencontainers.image.title"] == "cubebench-cpu"
    assert labels["org.opencontainers.image.version"]
    torch_build = _in_image("python", "-c", "import torch; print(torch.__version__)")
    assert torch_build.endswith("+cpu")


def test_a_rerun_in_the_image_gives_the_same_numbers(image, suite_run):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cases = "sklearn-sgd,torch-mlp,keras-mlp"
    subprocess.run(
        [
            *NOX,
            "-s",
            "bench-cpu",
            "--",
            "--cube=synthetic:tiny",
            "--epochs=2",
            f"--cases={cases}",
            "--run-id=rerun",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**env, "CUBEBENCH_RESULTS": str(suite_run)},
        timeout=1800,
    )
    first = {r["case"]: r for r in results.load_run(suite_run / "in-docker")[1]}
    for again in results.load_run(suite_run / "rerun")[1]:
        before = first[again["case"]]["metrics"]
        if again["library"] == "scikit-learn":
            assert again["metrics"]["rmse"] == before["rmse"]
        else:
            assert again["metrics"]["rmse"] == pytest.approx(before["rmse"], rel=1e-3)


def test_a_dead_tracking_server_costs_the_container_run_nothing(image, tmp_path):
    """mlflow is down when the suite starts in the container: the case runs, its result lands
    on the host, and `cubebench sync` on the host pushes it afterwards."""
    import socket

    with socket.socket() as probe:  # a loopback port where nothing listens
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    out = tmp_path / "results"
    env = {**os.environ, "CUBEBENCH_RESULTS": str(out), "MLFLOW_TRACKING_URI": dead}
    args = ["--cube", "synthetic:tiny", "--cases", "sklearn-sgd", "--run-id", "offline"]
    proc = _nox("-s", "bench-cpu", "--", *args, env=env)
    assert "cubebench sync /results/offline" in proc.stdout + proc.stderr
    _, found = results.load_run(out / "offline")
    assert [(r["case"], r["status"]) for r in found] == [("sklearn-sgd", "ok")]

    host_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    sync = subprocess.run(
        [sys.executable, "-m", "cubebench", "sync", str(out / "offline")],
        capture_output=True,
        text=True,
        env=host_env,
        timeout=300,
    )
    assert sync.returncode == 0, sync.stderr
    assert "pushed 1 case(s) (sklearn-sgd)" in sync.stdout
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cubebench")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`cubebench.role` = 'case'")
    assert run.data.tags["cubebench.complete"] == "true"
    assert run.data.metrics["rmse"] == found[0]["metrics"]["rmse"]


def test_two_containers_join_one_run_as_bench_gpu_runs_its_images(image, tmp_path):
    """`bench-gpu` runs each framework's cases in its own container with `run --join`: two
    containers (here both of the CPU image: no GPU here) add their cases to one run on the
    host's volume, under the run lock, with one report and one mlflow parent run."""
    out = tmp_path / "results"
    out.mkdir()
    subprocess.run(["chown", "-R", "1000:1000", str(out)], check=True)
    common = ["run", "--out", "/results", "--cube", "synthetic:tiny", "--epochs", "1"]
    for cases in ("sklearn-sgd", "torch-mlp"):
        _docker("run", "--rm", "--network", "none", "--volume", f"{out}:/results",
                "--env", f"CUBEBENCH_IMAGE_DIGEST={image}", IMAGE,
                *common, "--join", "joined", "--cases", cases)  # fmt: skip
    manifest, found = results.load_run(out / "joined")
    assert manifest["cases"] == ["sklearn-sgd", "torch-mlp"]
    assert [(r["case"], r["status"]) for r in found] == [("sklearn-sgd", "ok"), ("torch-mlp", "ok")]
    assert all(r["environment"]["image"]["digest"] == image for r in found)
    assert "torch-mlp" in (out / "joined" / "report.md").read_text()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cubebench")
    runs = client.search_runs([experiment.experiment_id], "tags.`cubebench.run_id` = 'joined'")
    (parent,) = [r for r in runs if r.data.tags["cubebench.role"] == "suite"]
    assert parent.data.tags["cubebench.cases"] == "sklearn-sgd,torch-mlp"
    children = [r for r in runs if r.data.tags["cubebench.role"] == "case"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: nothing to say")
def test_bench_gpu_without_a_gpu_says_so_in_one_line():
    """No NVIDIA GPU here: `nox -s bench-gpu` stops before any container starts, saying why."""
    proc = subprocess.run(
        [*NOX, "-s", "bench-gpu", "--", "--cube", "synthetic:tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    (line,) = [line for line in (proc.stdout + proc.stderr).splitlines() if "aborted" in line]
    assert line.endswith("no NVIDIA GPU here (nvidia-smi finds none): use `nox -s bench-cpu`.")
