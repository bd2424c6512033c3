"""Results to mlflow and TensorBoard, against a real `mlflow server` on 127.0.0.1.

Nested runs with params, metrics (per-epoch with steps), system metrics and artifacts read
back through MlflowClient; a server killed mid-suite costs nothing and `cubebench sync`
pushes what is missing, exactly once; TensorBoard event files read back with TensorBoard's
reader; fake secrets in the environment appear nowhere.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from cubebench import results
from cubebench.redact import MASK, scrub, scrub_tree
from cubebench.tensorboard import read_scalars
from cubebench.tracking import case_metrics
from fake_cases import mean_case
from loopback import free_port
from run_cli import CLI, run_cubebench

pytestmark = [pytest.mark.server, pytest.mark.slow]

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-8d7c6b5a",
    "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-1f2e3d",
    "MY_SERVICE_API_KEY": "fake-api-key-0a9b8c",
    "DB_PASSWORD": "fake-db-password-77aa",
}

# waits for the test: it writes `started`, then blocks until `release` exists
GATE = """import os, pathlib, time
        gate = pathlib.Path(os.environ["CUBEBENCH_TEST_GATE"])
        (gate / "started").touch()
        deadline = time.time() + 300
        while not (gate / "release").exists() and time.time() < deadline:
            time.sleep(0.05)"""


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over a sqlite store; stop() kills its process group."""

    def __init__(self, root: Path):
        self.root = root
        self.proc: subprocess.Popen | None = None
        self.uri = ""

    def start(self) -> MlflowServer:
        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
            env={k: v for k, v in os.environ.items() if k not in SECRETS},
        )
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


def _env(**extra: str) -> dict[str, str]:
    """This environment without a tracking URI, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, **extra}


def _suite_args(cases: Path, out: Path) -> list[str]:
    return ["--cube", "synthetic:tiny", "--cases-dir", str(cases), "--out", str(out)]


def _runs(client: MlflowClient, run_id: str, view=ViewType.ACTIVE_ONLY):
    experiment = client.get_experiment_by_name("cubebench")
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`cubebench.run_id` = '{run_id}'",
        run_view_type=view,
    )


def _by_case(runs) -> dict[str, list]:
    out: dict[str, list] = {}
    for run in runs:
        if run.data.tags.get("cubebench.role") == "case":
            out.setdefault(run.data.tags["cubebench.case"], []).append(run)
    return out


# --- a real suite into a real server ----------------------------------------------------------


@pytest.fixture(scope="module")
def tracked_run(server, tmp_path_factory):
    """sklearn-sgd and torch-mlp on tiny into the server, with fake secrets in the env."""
    out = tmp_path_factory.mktemp("tracked")
    proc = run_cubebench(
        "run",
        "--cube",
        "synthetic:tiny",
        "--cases",
        "sklearn-sgd,torch-mlp",
        "--epochs",
        "3",
        "--out",
        str(out),
        "--run-id",
        "tracked",
        "--threads",
        "2",
        env=_env(MLFLOW_TRACKING_URI=server.uri, **SECRETS),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out / "tracked"


def test_suite_and_cases_are_nested_runs_with_params_metrics_and_artifacts(
    server, tracked_run, tmp_path
):
    _, run_dir = tracked_run
    client = server.client()
    runs = _runs(client, "tracked")
    parents = [r for r in runs if r.data.tags["cubebench.role"] == "suite"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["cubebench.complete"] == "true"
    assert parent.data.tags["host"] == socket.gethostname()
    environment = json.loads((run_dir / "environment.json").read_text())
    assert parent.data.tags.get("git_sha") == environment["git_sha"]
    assert parent.data.params["cube"] == "synthetic:tiny"
    assert parent.data.tags["cubebench.cases"] == "sklearn-sgd,torch-mlp"
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/run.json"} <= report

    cases = _by_case(runs)
    assert sorted(cases) == ["sklearn-sgd", "torch-mlp"]
    for name, (run,) in cases.items():
        result = json.loads((run_dir / f"{name}.json").read_text())
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["case"] == name
        assert params["library"] == result["library"]
        assert params["library_version"] == result["library_version"]
        assert params["device"] == "cpu" and params["task"] == "lst-from-t2m"
        assert params["cube_fingerprint"] == result["cube"]["fingerprint"]
        assert params["chunk_shape"] == str(result["cube"]["chunk_shape"])
        assert params["threads"] == "2" and params["epochs"] == "3"
        for key in result["params"]:  # every hyperparameter
            assert params[key] == str(result["params"][key])
        # every number of the result, equal to the file
        expected = case_metrics(result)
        assert expected["rmse"] == result["metrics"]["rmse"]
        for key, value in expected.items():
            assert run.data.metrics[key] == pytest.approx(value, rel=1e-12), key
        # per-epoch losses with their step
        history = client.get_metric_history(run.info.run_id, "epoch.train_loss")
        assert sorted((m.step, m.value) for m in history) == [
            (e["epoch"], pytest.approx(e["train_loss"])) for e in result["epochs"]
        ]
        assert len(history) == 3
        # system metrics were sampled while the case ran
        assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
        assert any(k.startswith("system/system_memory_usage") for k in run.data.metrics)
        # artifacts: the result file as written, and the TensorBoard events
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / name)))
        assert json.loads((local / f"{name}.json").read_text()) == result
        scalars = read_scalars(local / "tensorboard")
        assert [v for _, v in scalars["loss/train"]] == pytest.approx(
            [e["train_loss"] for e in result["epochs"]]
        )


def test_tensorboard_event_files_hold_the_training_curves(tracked_run):
    _, run_dir = tracked_run
    result = json.loads((run_dir / "torch-mlp.json").read_text())
    scalars = read_scalars(run_dir / "tb" / "torch-mlp")
    epochs = result["epochs"]
    assert scalars["loss/train"] == [
        (e["epoch"], pytest.approx(e["train_loss"], rel=1e-6)) for e in epochs
    ]
    assert scalars["loss/val"] == [
        (e["epoch"], pytest.approx(e["val_loss"], rel=1e-6)) for e in epochs
    ]
    assert [v for _, v in scalars["samples_per_s"]] == pytest.approx(
        [e["samples"] / e["seconds"] for e in epochs], rel=1e-5
    )
    rates = [v for _, v in scalars["learning_rate"]]
    assert rates == pytest.approx([e["lr"] for e in epochs], rel=1e-6)
    assert rates[0] > rates[-1]  # cosine decay


def test_tensorflow_stays_out_of_processes_that_do_not_need_it(tmp_path):
    code = (
        "import sys; from cubebench.tensorboard import ScalarWriter, read_scalars; "
        f"w = ScalarWriter({str(tmp_path)!r}); w.add_scalars(1, {{'a': 2.0}}); w.close(); "
        f"assert read_scalars({str(tmp_path)!r}) == {{'a': [(1, 2.0)]}}; "
        "import cubebench.tracking, cubebench.runner; "
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_secrets_appear_nowhere(server, tracked_run, tmp_path):
    proc, run_dir = tracked_run
    client = server.client()
    haystack = [proc.stdout, proc.stderr]
    for run in _runs(client, "tracked"):
        haystack += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        haystack += list(run.data.metrics)
        where = str(tmp_path / run.info.run_id)
        local = Path(client.download_artifacts(run.info.run_id, "", where))
        haystack += [p.read_bytes().decode("latin-1") for p in local.rglob("*") if p.is_file()]
    # everything the suite wrote: results, specs, logs, report, event files
    haystack += [p.read_bytes().decode("latin-1") for p in run_dir.rglob("*") if p.is_file()]
    text = "\n".join(haystack)
    assert "fake-" not in text
    for value in SECRETS.values():
        assert value not in text


def test_redaction_rules():
    secrets = list(SECRETS.values())
    assert scrub("s3://user:pw@host/cube.zarr", []) == f"s3://{MASK}@host/cube.zarr"
    assert scrub(f"token {SECRETS['DB_PASSWORD']} here", secrets) == f"token {MASK} here"
    tree = {"key": "abc", "secret": None, "nested": [{"api_token": "x"}], "plain": "ok"}
    assert scrub_tree(tree, secrets) == {
        "key": MASK,
        "secret": None,
        "nested": [{"api_token": MASK}],
        "plain": "ok",
    }


# --- nothing lost: a server that dies mid-suite -----------------------------------------------


def test_server_killed_mid_suite_then_sync_pushes_every_case_once(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "a_first.py").write_text(mean_case(name="first", wait="pass"))
    (cases / "b_gated.py").write_text(mean_case(name="gated", wait=GATE))
    (cases / "c_last.py").write_text(mean_case(name="last", wait="pass"))
    gate = tmp_path / "gate"
    gate.mkdir()
    server = MlflowServer(tmp_path / "store-dir")
    (tmp_path / "store-dir").mkdir()
    server.start()
    out = tmp_path / "results"
    env = _env(MLFLOW_TRACKING_URI=server.uri, CUBEBENCH_TEST_GATE=str(gate))
    suite = subprocess.Popen(
        [*CLI, "run", *_suite_args(cases, out), "--run-id", "killed", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.time() + 300
        while not (gate / "started").exists():
            assert suite.poll() is None and time.time() < deadline, suite.communicate()
            time.sleep(0.1)
        server.stop()  # the gated case is running; its nested run exists on the server
        (gate / "release").touch()
        _, stderr = suite.communicate(timeout=600)
    finally:
        (gate / "release").touch()
        suite.kill()
    assert suite.returncode == 0, stderr[-3000:]
    assert "cubebench sync" in stderr
    run_dir = out / "killed"
    _, found = results.load_run(run_dir)  # nothing lost: every result on disk, all ok
    assert [r["case"] for r in found] == ["first", "gated", "last"]
    assert all(r["status"] == "ok" for r in found)

    server.start()  # same store, new port
    client = server.client()
    before = _by_case(_runs(client, "killed"))
    assert before["first"][0].data.tags["cubebench.complete"] == "true"
    assert before["gated"][0].data.tags["cubebench.complete"] == "false"  # half-logged
    assert "last" not in before

    sync_env = {**env, "MLFLOW_TRACKING_URI": server.uri}
    first = run_cubebench("sync", str(run_dir), env=sync_env)
    assert first.returncode == 0, first.stderr
    assert "pushed 2 case(s) (gated, last), 1 already there" in first.stdout
    after = _by_case(_runs(client, "killed"))
    assert {name: len(runs) for name, runs in after.items()} == {"first": 1, "gated": 1, "last": 1}
    for result in found:
        (run,) = after[result["case"]]
        assert run.data.tags["cubebench.complete"] == "true"
        assert run.data.metrics["rmse"] == result["metrics"]["rmse"]
        history = client.get_metric_history(run.info.run_id, "epoch.train_loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1]
    suites = [r for r in _runs(client, "killed") if r.data.tags["cubebench.role"] == "suite"]
    assert len(suites) == 1 and suites[0].data.tags["cubebench.complete"] == "true"

    every_run = len(_runs(client, "killed", ViewType.ALL))
    second = run_cubebench("sync", str(run_dir), env=sync_env)
    assert second.returncode == 0, second.stderr
    assert "pushed 0 case(s), 3 already there" in second.stdout
    assert len(_runs(client, "killed", ViewType.ALL)) == every_run  # no duplicates
    server.stop()


def test_unreachable_server_at_start_then_sync(server, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "a_first.py").write_text(mean_case(name="first", wait="pass"))
    out = tmp_path / "results"
    dead = f"http://127.0.0.1:{free_port()}"
    args = ["run", *_suite_args(cases, out), "--run-id", "offline"]
    proc = run_cubebench(*args, env=_env(MLFLOW_TRACKING_URI=dead))
    assert proc.returncode == 0, proc.stderr
    assert "1 of 1 cases are only on disk" in proc.stderr
    assert (out / "offline" / "first.json").exists()
    synced = run_cubebench("sync", str(out / "offline"), env=_env(MLFLOW_TRACKING_URI=server.uri))
    assert synced.returncode == 0, synced.stderr
    assert list(_by_case(_runs(server.client(), "offline"))) == ["first"]


def test_default_store_is_sqlite_in_the_results_dir(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "a_first.py").write_text(mean_case(name="first", wait="pass"))
    out = tmp_path / "results"
    proc = subprocess.run(
        [*CLI, "run", *_suite_args(cases, out), "--run-id", "local"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "mlflow.db").is_file()
    assert not (tmp_path / "mlruns").exists()  # never the plain-folder store
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = _by_case(_runs(client, "local"))["first"]
    assert run.info.artifact_uri.startswith((out / "mlartifacts").as_uri())
    assert "first.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # a second sync of a run already tracked adds nothing
    again = run_cubebench("sync", str(out / "local"), env=_env())
    assert "pushed 0 case(s), 1 already there" in again.stdout


def test_sync_errors_are_one_line(tmp_path, tracked_run):
    from test_errors import assert_user_error

    missing = run_cubebench("sync", str(tmp_path / "nope"), env=_env())
    assert_user_error(missing, "no results directory")
    _, run_dir = tracked_run
    dead = _env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
    unreachable = run_cubebench("sync", str(run_dir), env=dead)
    assert_user_error(unreachable, "mlflow at http://127.0.0.1:")


# --- repeats: the case's run holds the aggregate, one nested run per repeat -----------------


def test_repeats_are_nested_under_their_case_with_the_aggregate(server, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "mean.py").write_text(mean_case())
    out = tmp_path / "out"
    args = [*_suite_args(cases, out), "--run-id", "repeated", "--repeat", "3", "--vary-split"]
    proc = run_cubebench("run", *args, env=_env(MLFLOW_TRACKING_URI=server.uri))
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = server.client()
    runs = _runs(client, "repeated")
    (case_run,) = _by_case(runs)["mean"]
    repeats = [r for r in runs if r.data.tags.get("cubebench.role") == "repeat"]
    assert sorted(int(r.data.tags["cubebench.repeat"]) for r in repeats) == [0, 1, 2]
    assert {r.data.tags["mlflow.parentRunId"] for r in repeats} == {case_run.info.run_id}
    found = [
        json.loads((out / "repeated" / f"{results.result_name('mean', k)}.json").read_text())
        for k in range(3)
    ]
    for run in repeats:
        result = found[int(run.data.tags["cubebench.repeat"])]
        assert run.data.params["seed"] == str(result["seed"])
        assert run.data.params["split_seed"] == str(result["split_seed"])
        assert run.data.metrics["rmse"] == pytest.approx(result["metrics"]["rmse"], rel=1e-12)
    rmse = [r["metrics"]["rmse"] for r in found]
    metrics = case_run.data.metrics
    assert case_run.data.tags["cubebench.complete"] == "true"
    assert metrics["repeats.ok"] == 3 and metrics["repeats.failed"] == 0
    assert metrics["rmse.mean"] == pytest.approx(sum(rmse) / 3, rel=1e-12)
    assert metrics["rmse.ci95_low"] < metrics["rmse.mean"] < metrics["rmse.ci95_high"]
    # `sync` finds everything there: nothing pushed twice
    sync = run_cubebench("sync", str(out / "repeated"), env=_env(MLFLOW_TRACKING_URI=server.uri))
    assert sync.returncode == 0, sync.stderr
    assert "pushed 0 case(s)" in sync.stdout
    assert len(_runs(client, "repeated")) == len(runs)
