"""One run across several processes (`cubebench run --join`): `nox -s bench-gpu` runs each
framework's cases in its own image into one run directory. The suites take turns under the run
lock, share one manifest, one report and one mlflow parent run, and a join with other settings
is refused without touching what is there."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime

import pytest
from mlflow.tracking import MlflowClient

from cubebench import results
from fake_cases import mean_case
from run_cli import CLI, run_cubebench

COMMON = ("--cube", "synthetic:tiny", "--threads", "1", "--epochs", "2")


@pytest.fixture
def cases_dir(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    # `slow` holds the run lock for a few seconds: the other suite must wait for it
    (cases / "a_slow.py").write_text(mean_case("slow", wait="import time; time.sleep(4)"))
    (cases / "b_quick.py").write_text(mean_case("quick"))
    (cases / "c_third.py").write_text(mean_case("third"))
    return cases


def _join(out, cases_dir, cases: str, *extra: str) -> list[str]:
    return ["run", *COMMON, "--cases-dir", str(cases_dir), "--out", str(out), "--cases", cases,
            "--join", "shared", *extra]  # fmt: skip


def _interval(result: dict) -> tuple[datetime, datetime]:
    return (
        datetime.fromisoformat(result["started_at"]),
        datetime.fromisoformat(result["finished_at"]),
    )


@pytest.mark.slow  # two suites with mlflow, one after the other
def test_two_suites_joining_at_once_make_one_run_with_one_report_and_one_parent(
    tmp_path, cases_dir
):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [
        subprocess.Popen(
            [*CLI, *_join(out, cases_dir, names)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for names in ("slow", "quick")
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]

    run_dir = out / "shared"
    manifest, found = results.load_run(run_dir)
    assert sorted(manifest["cases"]) == ["quick", "slow"]
    assert manifest["status"] == "finished"
    assert set(manifest["outcomes"]) == {"quick", "slow"}
    assert len(manifest["joined"]) == 1  # the second suite joined the first one's run
    assert {r["case"]: r["status"] for r in found} == {"quick": "ok", "slow": "ok"}
    assert {r["run_id"] for r in found} == {"shared"}
    # they took turns: one suite's case ran wholly before the other's began
    first, second = sorted(_interval(r) for r in found)
    assert first[1] <= second[0]
    report = (run_dir / "report.md").read_text()
    assert "slow" in report and "quick" in report

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cubebench")
    runs = client.search_runs([experiment.experiment_id], "tags.`cubebench.run_id` = 'shared'")
    (parent,) = [r for r in runs if r.data.tags["cubebench.role"] == "suite"]
    assert sorted(parent.data.tags["cubebench.cases"].split(",")) == ["quick", "slow"]
    assert parent.data.tags["cubebench.complete"] == "true"
    children = [r for r in runs if r.data.tags["cubebench.role"] == "case"]
    assert sorted(r.data.tags["cubebench.case"] for r in children) == ["quick", "slow"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}


@pytest.mark.slow  # three suites
def test_a_join_adds_cases_skips_finished_ones_and_refuses_other_settings(tmp_path, cases_dir):
    out = tmp_path / "results"
    first = run_cubebench(*_join(out, cases_dir, "quick"), "--no-tracking")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = out / "shared"
    quick = (run_dir / "quick.json").read_bytes()

    # other settings: one line, exit 2, and the run is as it was
    other = run_cubebench(*_join(out, cases_dir, "third"), "--no-tracking", "--seed", "7")
    assert other.returncode == 2
    (line,) = other.stderr.strip().splitlines()
    assert "run 'shared' has other settings: seed=7 (run: 0)" in line
    assert not (run_dir / "third.json").exists()
    assert json.loads((run_dir / "run.json").read_text())["cases"] == ["quick"]

    # the same settings: `third` is added and runs, `quick` has a result and does not run again
    again = run_cubebench(*_join(out, cases_dir, "quick,third"), "--no-tracking")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "quick.json").read_bytes() == quick
    manifest, found = results.load_run(run_dir)
    assert manifest["cases"] == ["quick", "third"]
    assert [(r["case"], r["status"]) for r in found] == [("quick", "ok"), ("third", "ok")]
    assert manifest["joined"][0]["cases"] == ["quick", "third"]


def test_join_names_the_run_itself(tmp_path, cases_dir):
    out = tmp_path / "results"
    proc = run_cubebench(*_join(out, cases_dir, "quick"), "--run-id", "other")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "cubebench: error: --join names the run itself: drop --resume and --run-id"
    )
    assert not out.exists()  # nothing was created


def test_bench_gpu_runs_every_case_once_in_its_frameworks_image():
    """`nox -s bench-gpu`'s plan over the real cases: each in exactly one image, torch's in
    the torch image, the rest beside TensorFlow; a selection keeps its cases only."""
    from noxfile import gpu_plan

    from cubebench.discovery import discover

    listing = [{"case": n, "library": cls.library} for n, (_, cls) in discover().items()]
    plan = gpu_plan(listing, "all")
    assert sorted(n for cases in plan.values() for n in cases) == sorted(c["case"] for c in listing)
    for flavour, cases in plan.items():
        libraries = {c["library"] for c in listing if c["case"] in cases}
        assert ("torch" in libraries) == (flavour == "cuda-torch")
        assert len(libraries & {"torch", "keras"}) == 1  # one framework per image
    assert gpu_plan(listing, "keras-mlp,torch-mlp") == {
        "cuda-tf": ["keras-mlp"],
        "cuda-torch": ["torch-mlp"],
    }
    with pytest.raises(ValueError, match="unknown case"):
        gpu_plan(listing, "torch-mlp,nope")


@pytest.mark.slow  # three suites
def test_the_report_of_a_run_joined_across_images_says_which_case_ran_in_which(tmp_path, cases_dir):
    out = tmp_path / "results"
    for cases in ("quick", "third"):
        proc = run_cubebench(*_join(out, cases_dir, cases), "--no-tracking")
        assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out / "shared"
    # as if each case had run in its own image (bench-gpu passes the digest; the image's
    # environment carries its lock hash)
    for case, digest in (("quick", "sha256:1111"), ("third", "sha256:2222")):
        path = run_dir / f"{case}.json"
        result = json.loads(path.read_text())
        result["environment"]["image"] = {"digest": digest, "lock_hash": digest[-4:]}
        path.write_text(json.dumps(result))
    from cubebench.report import write_report

    write_report(run_dir)
    lines = [line for line in (run_dir / "report.md").read_text().splitlines() if "image" in line]
    assert lines == [
        "- **image**: sha256:1111 (lock 1111; numpy "
        + json.loads((run_dir / "quick.json").read_text())["library_version"]
        + "): quick",
        "- **image**: sha256:2222 (lock 2222; numpy "
        + json.loads((run_dir / "third.json").read_text())["library_version"]
        + "): third",
    ]
