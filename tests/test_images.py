"""The CPU image, end to end on a real Docker engine: built offline from the debootstrap base
and the wheelhouse, `nox -s bench-cpu` runs the whole suite in it, results and mlflow runs
land on the host, the image matches its lock, runs as non-root, and reruns give the same
numbers. The CUDA lock is resolved (no GPU here to run it).

The engine comes from `images/ensure-docker.sh`, which the `tests` nox session runs first.
"""

from __future__ import annotations

import json
import os
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
PIP_DRY_RUN = (sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet")
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


def test_the_cuda_lock_resolves_with_one_cuda_stack():
    """No GPU here: pip resolves the CUDA lock against the index (nothing is installed) and
    every NVIDIA library it pulls is for the same CUDA major version."""
    lock = ROOT / "images/cuda/requirements.lock"
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    proc = subprocess.run(
        [*PIP_DRY_RUN, "--report", "-", "-r", str(lock)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    resolved = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
    locked = {
        line.split("==")[0].strip().lower(): line.split("==")[1].strip()
        for line in lock.read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    # the lock is complete and exact: resolving it with dependencies adds and changes nothing
    assert {_canonical(n): v for n, v in resolved.items()} == {
        _canonical(n): v for n, v in locked.items()
    }
    assert resolved["torch"] == "2.10.0" and resolved["tensorflow"] == "2.20.0"
    majors = {n.rsplit("-cu", 1)[1] for n in resolved if n.startswith("nvidia-") and "-cu" in n}
    assert len(majors) == 1, majors


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


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
