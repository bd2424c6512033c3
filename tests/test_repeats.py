"""`cubebench run --repeat N [--vary-split]`: every case N times with seeds seed..seed+N-1,
interleaved (repeat 0 of every case, then repeat 1, ...), one result file per repeat, the split
seed moving only with `--vary-split`; an interrupted run resumes the missing repeats only."""

from __future__ import annotations

import json

import pytest

from cubebench import results
from fake_cases import mean_case
from run_cli import run_cubebench

pytestmark = pytest.mark.slow


def _run(tmp_path, *args: str, run_id: str = "rep"):
    cases = tmp_path / "cases"
    cases.mkdir(exist_ok=True)
    (cases / "a.py").write_text(mean_case("a"))
    (cases / "b.py").write_text(mean_case("b"))
    out = tmp_path / "out"
    proc = run_cubebench(
        "run",
        *("--cube", "synthetic:tiny", "--cases-dir", str(cases), "--out", str(out)),
        *("--run-id", run_id, "--no-tracking", "--threads", "1", "--seed", "5", *args),
    )
    return proc, out / run_id


def test_repeats_move_the_seed_and_keep_the_split(tmp_path):
    proc, run_dir = _run(tmp_path, "--repeat", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest, found = results.load_run(run_dir)
    assert manifest["repeat"] == 2 and manifest["vary_split"] is False
    assert [(r["case"], r["repeat"]) for r in found] == [
        (case, k) for case in ("a", "b") for k in range(2)
    ]
    assert sorted(p.name for p in run_dir.glob("a*.json")) == ["a.json", "a@1.json"]
    for result in found:
        assert result["seed"] == 5 + result["repeat"]
        assert result["split_seed"] == 0  # the task's own split every time
    # the same split: the same test pixels, the same mean-model metrics
    assert len({r["metrics"]["rmse"] for r in found if r["case"] == "a"}) == 1
    # interleaved: repeat 0 of both cases before any repeat 1
    order = list(manifest["outcomes"])
    assert order == ["a", "b", "a@1", "b@1"]
    summary = json.loads((run_dir / "summary.json").read_text())
    rmse = summary["tasks"]["lst-from-t2m"]["cases"]["a"]["rmse"]
    assert rmse["n"] == 2 and rmse["sd"] == pytest.approx(0.0, abs=1e-9)


def test_vary_split_moves_the_split_seed_and_the_test_set(tmp_path):
    proc, run_dir = _run(tmp_path, "--repeat", "2", "--vary-split", "--cases", "a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, found = results.load_run(run_dir)
    assert [r["split_seed"] for r in found] == [0, 1]
    assert found[0]["metrics"]["n"] != found[1]["metrics"]["n"]  # another test part


def test_resume_runs_only_the_missing_repeats(tmp_path):
    proc, run_dir = _run(tmp_path, "--repeat", "2", "--cases", "a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = (run_dir / "a.json").read_text()
    (run_dir / "a@1.json").unlink()  # as if the run had been stopped before it
    manifest = json.loads((run_dir / "run.json").read_text())
    manifest["status"] = "interrupted"
    (run_dir / "run.json").write_text(json.dumps(manifest))
    proc = run_cubebench(
        "run",
        "--resume",
        "rep",
        "--out",
        str(run_dir.parent),
        "--cases-dir",
        str(tmp_path / "cases"),
        "--no-tracking",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "a.json").read_text() == kept  # not run again
    assert json.loads((run_dir / "a@1.json").read_text())["seed"] == 6
