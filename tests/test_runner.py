"""The runner: every case in its own process; a case that raises, hangs or is killed becomes
a failed result with the reason, and the others still finish; metrics equal numpy."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cubebench import results
from cubebench.metrics import RegressionMetrics
from fake_cases import mean_case
from run_cli import run_cubebench

FAULTY_CASES = {
    "raises": "raise RuntimeError('boom in fit')",
    "hangs": "import time; time.sleep(600)",
    "killed": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    # beyond a memory limit (as `ulimit -v` or a batch system sets): 32 GiB under a 16 GiB cap
    "oom": "import resource; resource.setrlimit(resource.RLIMIT_AS, (2**34, 2**34)); "
    "bytearray(2**35)",
}


def _faulty(name: str, body: str) -> str:
    return textwrap.dedent(f'''
        from cubebench.case import Case as Base

        class Case(Base):
            name = "{name}"
            library = "numpy"

            def fit(self):
                {body}

            def predict(self, x):
                return x[:, 0]
    ''')


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    cases = tmp_path_factory.mktemp("cases")
    (cases / "a_mean.py").write_text(mean_case())
    for name, body in FAULTY_CASES.items():
        (cases / f"b_{name}.py").write_text(_faulty(name, body))
    out = tmp_path_factory.mktemp("results")
    proc = run_cubebench(
        "run",
        "--cube",
        "synthetic:tiny",
        "--cases-dir",
        str(cases),
        "--out",
        str(out),
        "--run-id",
        "faults",
        "--timeout",
        "30",
        "--threads",
        "1",
    )
    return proc, out / "faults"


@pytest.mark.slow  # a suite with a case that hangs until its timeout
def test_faults_become_failed_results_and_the_suite_goes_on(faulty_run):
    proc, run_dir = faulty_run
    assert proc.returncode == 1, proc.stderr  # some cases failed
    manifest, found = results.load_run(run_dir)  # every file validates against the schema
    by_case = {r["case"]: r for r in found}
    assert list(by_case) == ["mean", "hangs", "killed", "oom", "raises"]  # the manifest's order
    assert by_case["mean"]["status"] == "ok"
    assert by_case["raises"]["status"] == "failed"
    assert by_case["raises"]["reason"] == "RuntimeError: boom in fit"
    assert by_case["hangs"]["reason"] == "timed out after 30 s"
    assert by_case["killed"]["reason"] == "killed by SIGKILL (out of memory?)"
    assert by_case["oom"]["reason"].startswith("MemoryError")
    assert manifest["status"] == "finished"
    assert {n: o["status"] for n, o in manifest["outcomes"].items()} == {
        "mean": "ok",
        "raises": "failed",
        "hangs": "failed",
        "killed": "failed",
        "oom": "failed",
    }
    # the traceback of the raising case is kept in its log, not in the result
    assert "Traceback" in (run_dir / "logs" / "raises.log").read_text()


@pytest.mark.slow  # a suite with a case that hangs until its timeout
def test_metrics_equal_a_numpy_reference(faulty_run, tiny_task):
    _, run_dir = faulty_run
    result = json.loads((run_dir / "mean.json").read_text())
    _, y = tiny_task.load_part("test")
    error = tiny_task.target_mean - y  # the case predicts the train mean
    metrics = result["metrics"]
    assert metrics["n"] == len(y) == tiny_task.samples["test"]
    np.testing.assert_allclose(metrics["rmse"], np.sqrt(np.mean(error**2)), rtol=1e-5)
    np.testing.assert_allclose(metrics["mae"], np.mean(np.abs(error)), rtol=1e-5)
    np.testing.assert_allclose(metrics["bias"], np.mean(error), rtol=1e-4, atol=1e-6)
    r2 = 1 - np.sum(error**2) / np.sum((y - y.mean()) ** 2)
    np.testing.assert_allclose(metrics["r2"], r2, rtol=1e-5, atol=1e-6)
    assert metrics["noise_floor_nominal"] == tiny_task.noise_floor
    assert metrics["noise_floor_source"] == "realised"  # on these pixels, not the nominal
    assert metrics["units"] == "K" and metrics["eval_part"] == "test"
    # costs and throughput are measured, not made up
    assert [e["samples"] for e in result["epochs"]] == [tiny_task.samples["train"]] * 2
    assert result["throughput"]["train_samples"] == 2 * tiny_task.samples["train"]
    assert result["throughput"]["train_samples_per_s"] > 0
    # one epoch decodes every chunk holding train cells; it needs the train share of them
    chunks = tiny_task.part_chunks("train")
    sizes = [np.prod([s.stop - s.start for s in tiny_task.chunk_slices(c)]) for c in chunks]
    needed = sum(tiny_task.needed_cells("train")[c] for c in chunks)
    assert result["loading"]["read_amplification"] == pytest.approx(sum(sizes) / needed, abs=5e-5)
    assert result["loading"]["read_amplification"] > 1  # chunks shared with val and test
    assert 0 < result["loading"]["wait_fraction"] < 1  # its loop is ours: the wait is timed
    # no compute probe in this case's loop: the stall is unknown, not made up
    assert result["loading"]["stall_fraction"] is None
    assert result["loading"]["stall_method"] is None
    assert result["memory"]["peak_rss_mb"] > 0
    assert result["environment"]["threads"]["per_case"] == 1


@pytest.mark.slow  # a suite with a case that hangs until its timeout
def test_report_lists_every_case(faulty_run):
    _, run_dir = faulty_run
    table = (run_dir / "report.md").read_text()
    for case in ("mean", "raises", "hangs", "killed"):
        assert any(line.startswith("|") and case in line for line in table.splitlines()), case
    for name in ("report.html", "accuracy_vs_throughput.png", "loss_curves.png"):
        assert (run_dir / name).stat().st_size > 0


def test_streaming_metrics_equal_numpy():
    rng = np.random.default_rng(0)
    true = 290 + 20 * rng.standard_normal(10_001)
    pred = true + rng.normal(0.3, 1.5, true.shape)
    metrics = RegressionMetrics()
    for lo in range(0, len(true), 777):
        metrics.update(true[lo : lo + 777], pred[lo : lo + 777])
    m = metrics.result(noise_floor=1.5)
    e = pred - true
    np.testing.assert_allclose(m["rmse"], np.sqrt(np.mean(e**2)), rtol=1e-12)
    np.testing.assert_allclose(m["mae"], np.mean(np.abs(e)), rtol=1e-12)
    np.testing.assert_allclose(m["bias"], np.mean(e), rtol=1e-10)
    np.testing.assert_allclose(m["r2"], 1 - np.sum(e**2) / np.sum((true - true.mean()) ** 2))
    np.testing.assert_allclose(m["rmse_over_noise_floor"], m["rmse"] / 1.5)


def test_list_and_bad_selection(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "mean.py").write_text(mean_case())
    listed = run_cubebench("list", "--cases-dir", str(cases), "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[0]["case"] == "mean"
    proc = run_cubebench(
        "run", "--cube", "synthetic:tiny", "--cases-dir", str(cases), "--cases", "nope"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "cubebench: error: unknown case(s) ['nope']; known: mean"


def test_a_run_id_is_never_reused(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "mean.py").write_text(mean_case())
    existing = tmp_path / "out" / "taken"
    existing.mkdir(parents=True)
    (existing / "keep.json").write_text("{}")
    args = ["--cases-dir", str(cases), "--out", str(tmp_path / "out"), "--run-id", "taken"]
    proc = run_cubebench("run", "--cube", "synthetic:tiny", *args)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (existing / "keep.json").read_text() == "{}"  # nothing lost


def test_case_files_are_plain_python(tmp_path):
    from cubebench.discovery import discover

    (tmp_path / "mean.py").write_text(mean_case())
    (tmp_path / "_helpers.py").write_text("raise RuntimeError('not a case')")
    assert list(discover(Path(tmp_path))) == ["mean"]


def test_a_broken_case_file_is_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("import numpy as np\nclass Case(:\n")
    proc = run_cubebench("list", "--cases-dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.startswith("cubebench: error: case file ")
    assert "SyntaxError" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_case_named_twice_runs_once():
    from cubebench.discovery import select

    assert select({"a": None, "b": None}, "a, b,a") == ["a", "b"]
