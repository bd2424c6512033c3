"""The real cases through the real runner on `tiny`: each ends with a valid result, the same
seed gives the same numbers, and the report lists every case."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cubebench import results
from cubebench.discovery import discover

pytestmark = pytest.mark.slow

CASES = list(discover())
FRAMEWORKS = {"torch", "keras"}
# the rerun: one case per library and per kind of stream (pixels, windows); every case's own
# determinism is checked in-process by test_cases.py
RERUN = ["sklearn-sgd", "keras-mlp", "torch-cnn", "sklearn-hgb-gapfill"]


def _run(out, run_id: str, cases: list[str] | None = None) -> list[dict]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cubebench",
            "run",
            "--cube",
            "synthetic:tiny",
            "--epochs",
            "2",
            "--threads",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--run-id",
            run_id,
            "--timeout",
            "300",
            *(["--cases", ",".join(cases)] if cases else []),
        ],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, found = results.load_run(out / run_id)  # validates every file
    return found


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    return _run(out, "first"), _run(out, "second", RERUN), out


@pytest.fixture(scope="module")
def tiny_gapfill(tiny):
    from cubebench.task import get_task, prepare_task

    return prepare_task(get_task("lst-gapfill"), tiny)


def test_every_case_ends_with_a_valid_result(two_runs, tiny_task, tiny_gapfill):
    first, _, _ = two_runs
    assert [r["case"] for r in first] == CASES
    _, y = tiny_task.load_part("test")
    for result in first:
        assert result["status"] == "ok", result["reason"]
        metrics = result["metrics"]
        assert metrics["n"] > 0 and np.isfinite(metrics["rmse"])
        # every case learns something: far better than predicting the train mean
        baseline = np.sqrt(np.mean((y - tiny_task.target_mean) ** 2))
        if result["task"] == "lst-from-t2m":
            assert metrics["rmse"] < 0.5 * baseline, result["case"]
        if result["task"] == "lst-gapfill":  # scored on the hidden pixels only
            assert metrics["n"] == tiny_gapfill.windows.targets["test"], result["case"]
        assert result["throughput"]["train_samples_per_s"] > 0
        assert result["library_version"], result["case"]


def test_transfer_cases_report_their_baselines(two_runs):
    first, _, _ = two_runs
    transfer = [r for r in first if r["task"] == "lst-from-t2m-transfer"]
    assert {r["case"] for r in transfer} == {"torch-transfer", "keras-transfer"}
    for result in transfer:
        metrics = result["metrics"]
        assert list(metrics["by_predictor"]) == ["finetuned", "source_only", "scratch"]
        assert metrics["eval_part"] == "target_test"
        rmse = {k: v["rmse"] for k, v in metrics["by_predictor"].items()}
        assert metrics["rmse"] == rmse["finetuned"]
        np.testing.assert_allclose(metrics["transfer_gain"], rmse["scratch"] / rmse["finetuned"])


def test_same_seed_same_numbers(two_runs):
    first, second, _ = two_runs
    first = {r["case"]: r for r in first}
    assert sorted(r["case"] for r in second) == sorted(RERUN)
    for b in second:
        a = first[b["case"]]
        for key in ("rmse", "mae", "r2", "bias"):
            if a["library"] in FRAMEWORKS:  # float reductions may differ in the last bits
                np.testing.assert_allclose(a["metrics"][key], b["metrics"][key], rtol=1e-3)
            else:
                assert a["metrics"][key] == b["metrics"][key], (a["case"], key)


def test_report_table_lists_every_case(two_runs):
    _, _, out = two_runs
    rows = [line for line in (out / "first" / "report.md").read_text().splitlines()]
    for case in CASES:
        assert any(line.startswith("|") and f" {case} " in line for line in rows), case
