"""`cubebench compare` puts runs side by side, with the same means and intervals as a numpy /
scipy reference over the result files, and refuses runs that answered another question (the
split here) unless forced; `cubebench export` writes a Parquet table that pandas reads back
equal to the result files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cubebench import results
from fake_cases import mean_case
from run_cli import run_cubebench

pytestmark = pytest.mark.slow  # three suites with repeats


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs of two cases with two repeats each: `a` and `b` on the task's split, `c`
    on a time split."""
    cases = tmp_path_factory.mktemp("cases")
    (cases / "mean.py").write_text(mean_case("mean"))
    (cases / "other.py").write_text(mean_case("other"))
    out = tmp_path_factory.mktemp("results")
    common = ["--cube", "synthetic:tiny", "--cases-dir", str(cases), "--out", str(out)]
    common += ["--threads", "1", "--repeat", "2", "--no-tracking"]
    for run_id, extra in (("a", []), ("b", ["--seed", "5"]), ("c", ["--split", "chunks"])):
        proc = run_cubebench("run", *common, "--run-id", run_id, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_compare_gives_each_run_and_case_its_mean_and_interval(runs, tmp_path):
    proc = run_cubebench("compare", str(runs / "a"), str(runs / "b"), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert summary["runs"] == ["a", "b"] and summary["forced"] == []
    rows = summary["rows"]
    # grouped by case, the runs side by side in the given order
    assert [(r["case"], r["run"]) for r in rows] == [
        ("mean", "a"), ("mean", "b"), ("other", "a"), ("other", "b"),
    ]  # fmt: skip
    for row in rows:
        _, found = results.load_run(runs / row["run"])
        speeds = np.array(
            [r["throughput"]["train_samples_per_s"] for r in found if r["case"] == row["case"]]
        )
        assert len(speeds) == 2 and row["n_ok"] == 2
        assert row["train_samples_per_s"] == pytest.approx(speeds.mean(), rel=1e-12)
        half = stats.t.ppf(0.975, 1) * speeds.std(ddof=1) / np.sqrt(2)
        assert row["train_samples_per_s_half_width"] == pytest.approx(half, rel=1e-9)
    table = (tmp_path / "compare.md").read_text()
    assert table.count("| mean | ") == 2 and " ± " in table
    assert "<table>" in (tmp_path / "compare.html").read_text()


def test_compare_refuses_another_split_unless_forced(runs, tmp_path):
    args = ["compare", str(runs / "a"), str(runs / "c"), "--out", str(tmp_path / "x")]
    refused = run_cubebench(*args)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("cubebench: error: task lst-from-t2m differs between the runs")
    assert "split chunks" in line and line.endswith("not comparable (--force to compare)")
    assert not (tmp_path / "x").exists()
    forced = run_cubebench(*args, "--force", "--by", "run")
    assert forced.returncode == 2  # --by takes case, library, device or image
    forced = run_cubebench(*args, "--force", "--by", "device")
    assert forced.returncode == 0, forced.stderr
    assert "Forced despite: task lst-from-t2m differs" in (tmp_path / "x/compare.md").read_text()


def test_export_round_trips_through_pandas(runs, tmp_path):
    path = tmp_path / "all.parquet"
    proc = run_cubebench("export", str(runs / "a"), str(runs / "c"), "--parquet", str(path))
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_parquet(path)
    expected = [r for run in ("a", "c") for r in results.load_run(runs / run)[1]]
    assert len(frame) == len(expected) == 8
    assert list(frame["case"]) == [r["case"] for r in expected]
    assert list(frame["metrics.rmse"]) == [r["metrics"]["rmse"] for r in expected]
    assert list(frame["split"]) == [r["split"] for r in expected]
    assert list(frame["environment.python"]) == [r["environment"]["python"] for r in expected]
    epochs = [json.loads(e) for e in frame["epochs"]]
    assert epochs == [r["epochs"] for r in expected]
