"""benchmarks/gpu_check.sh, the prepared GPU check, run here as CPU_ONLY=1: the same steps on
the tiny cube, the "cuda" pass on the CPU; and its summary, gpu_check.json, against the result
files it summarises."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
HELPER = REPO / "benchmarks" / "scripts" / "gpu_summary.py"
CASES = ("torch-mlp", "torch-transfer", "torch-cnn")
STEPS = ["probe", "make-cube", "run-cuda", "run-cpu", "bench-loader"]
GPU_KEYS = {
    "name",
    "utilisation_mean_pct",
    "utilisation_p10_pct",
    "utilisation_samples",
    "sample_interval_s",
    "h2d_copy_s",
    "h2d_bytes",
    "h2d_note",
}
CHECK_LIMIT_S = 1000  # the script's own budget with CPU_ONLY is 900 s


def _env(**extra: str) -> dict[str, str]:
    """This environment (its CUBEBENCH_CACHE: the tiny cube is made once per session) without
    the check's own settings, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"WHEELS", "THREADS", "EPOCHS", "BUDGET_S", "LOADER_ADAPTER", "CPU_ONLY"}
    }
    return env | {"PYTHON": sys.executable} | extra


def _run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def check(tmp_path_factory: pytest.TempPathFactory, cube_cache: Path):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    proc = _run(str(out), timeout=CHECK_LIMIT_S, CPU_ONLY="1", THREADS="2")
    summary_path = out / "gpu_check.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return out, proc, summary


def _result(out: Path, run: str, case: str) -> dict:
    return json.loads((out / "runs" / run / f"{case}.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(CHECK_LIMIT_S + 100)
def test_cpu_only_check_passes_and_summarises(check):
    out, proc, summary = check
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary is not None
    assert f"summary in {out}/gpu_check.json" in proc.stdout
    assert summary["format"] == "cubebench-gpu-check/1"
    assert summary["ok"] is True and summary["failures"] == []
    assert summary["cpu_only"] is True
    assert "--device cpu" in summary["note"]
    settings = summary["settings"]
    assert settings["cube"] == "synthetic:tiny"
    assert settings["cuda_pass_device"] == "cpu"
    assert settings["threads"] == 2 and settings["epochs"] == 1
    assert settings["loader_threads"] == [1, 2]
    assert settings["cases"] == list(CASES)

    environment = summary["environment"]
    assert environment["cuda_available"] in (True, False)
    import torch

    assert environment["torch"] == torch.__version__
    assert environment["python"] == sys.version.split()[0]
    assert environment["cpu"]["count"] == os.cpu_count()
    assert "gpu" in environment  # nvidia-smi's, from the run's environment.json (null here)


@pytest.mark.slow
@pytest.mark.timeout(CHECK_LIMIT_S + 100)
def test_every_case_ran_on_both_passes_and_the_ratio_is_the_result_files(check):
    out, _, summary = check
    assert set(summary["cases"]) == set(CASES)
    for case in CASES:
        entry = summary["cases"][case]
        for run in ("cuda", "cpu"):
            side, result = entry[run], _result(out, run, case)
            assert side["status"] == "ok", side
            assert side["device"] == "cpu"  # CPU_ONLY: the cuda pass ran on the CPU
            assert side["samples_per_s"] > 0
            assert side["samples_per_s"] == result["throughput"]["train_samples_per_s"]
            assert side["fit_s"] == result["timing"]["fit_s"] > 0
            assert side["stall_fraction"] == result["loading"]["stall_fraction"]
            assert side["rmse"] == result["metrics"]["rmse"]
            assert math.isfinite(side["rmse"]) and side["rmse"] > 0
            assert entry["task"] == result["task"]
        # the cuda results' GPU block: null without a GPU, else the named figures
        block = entry["cuda"]["gpu"]
        assert block is None or set(block) >= GPU_KEYS
        assert "gpu" not in entry["cpu"]
        expected = np.float64(_result(out, "cuda", case)["throughput"]["train_samples_per_s"])
        expected /= np.float64(_result(out, "cpu", case)["throughput"]["train_samples_per_s"])
        assert entry["cuda_over_cpu_samples_per_s"] == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.slow
@pytest.mark.timeout(CHECK_LIMIT_S + 100)
def test_loader_rows_and_steps(check):
    out, _, summary = check
    loader = summary["loader"]
    assert loader["adapter"] == "torch" and loader["cube"] == "synthetic:tiny"
    assert [row["threads"] for row in loader["rows"]] == [1, 2]
    raw = [json.loads(line) for line in (out / "loader.jsonl").read_text().splitlines()]
    for row, line in zip(loader["rows"], raw, strict=True):
        assert row["items"] == "pairs"
        assert row["samples_per_s"] == line["pairs_per_s"] > 0
        assert row["raw_decode_per_s"] == line["raw_decode_pairs_per_s"] > 0
        low, high = row["ratio_to_raw_ci95"]
        assert 0 < low <= row["ratio_to_raw"] <= high
        assert row["sweep"]["sustained_rate_at_90"] == row["sustained_rate_at_90"] > 0
        assert row["sweep"]["points"]
    assert loader["ratio_at_8_over_ratio_at_2"] is None  # no 8-thread row here

    steps = summary["steps"]
    assert [s["name"] for s in steps] == STEPS  # no install: WHEELS is not set
    for step in steps:
        assert step["rc"] == 0 and not step["timed_out"] and not step["skipped"]
        assert 0 < step["seconds"] <= step["limit_s"]
        assert (out / step["log"]).is_file()
    assert sum(s["seconds"] for s in steps) <= summary["total_s"] < CHECK_LIMIT_S
    # the run directories stay, with their result files
    for run in ("cuda", "cpu"):
        assert {p.stem for p in (out / "runs" / run).glob("torch-*.json")} == set(CASES)


@pytest.mark.slow
@pytest.mark.timeout(CHECK_LIMIT_S + 100)
def test_a_failed_case_fails_the_check_and_is_summarised(check, tmp_path: Path):
    out, _, _ = check
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "gpu_check.json").unlink()
    path = copy / "runs" / "cpu" / "torch-cnn.json"
    result = json.loads(path.read_text())
    result |= {"status": "failed", "reason": "RuntimeError: planted"}
    path.write_text(json.dumps(result))
    args = ["--cube", "synthetic:tiny", "--epochs", "1", "--threads", "2"]
    args += ["--loader-threads", "1,2", "--loader-adapter", "torch", "--budget-s", "900"]
    proc = subprocess.run(
        [sys.executable, str(HELPER), "summary", str(copy), *args, "--cpu-only"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 1, proc.stderr
    summary = json.loads((copy / "gpu_check.json").read_text())
    assert summary["ok"] is False
    assert summary["failures"] == ["torch-cnn (cpu pass): failed: RuntimeError: planted"]
    assert "torch-cnn (cpu pass)" in proc.stderr
    entry = summary["cases"]["torch-cnn"]
    assert entry["cpu"]["status"] == "failed"
    assert entry["cuda_over_cpu_samples_per_s"] is None
    assert summary["cases"]["torch-mlp"]["cuda_over_cpu_samples_per_s"] > 0


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        ((), {}, "expected one argument, the output folder OUT_DIR, got 0"),
        (("a", "b"), {}, "expected one argument, the output folder OUT_DIR, got 2"),
        (("--bogus",), {}, "unknown option --bogus"),
        (("{tmp}/out",), {"THREADS": "0"}, "THREADS is a whole number above 0, got 0"),
        (("{tmp}/out",), {"CPU_ONLY": "yes"}, "CPU_ONLY is 0 or 1, got yes"),
        (("{tmp}/out",), {"PYTHON": "no-such-python"}, "no interpreter no-such-python"),
        (("{tmp}/out",), {"WHEELS": "{tmp}/none"}, "WHEELS={tmp}/none is not a folder"),
    ],
)
def test_bad_arguments_fail_with_one_line(args, env, says, tmp_path: Path):
    env = {key: value.format(tmp=tmp_path) for key, value in env.items()}
    proc = _run(*(a.format(tmp=tmp_path) for a in args), **env)
    says = says.format(tmp=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpu_check.sh: error: ")
    assert says in lines[0] and "usage: bash benchmarks/gpu_check.sh OUT_DIR" in lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_help_prints_the_usage():
    proc = _run("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: bash benchmarks/gpu_check.sh OUT_DIR")


def test_a_used_out_dir_is_refused(tmp_path: Path):
    (tmp_path / "runs").mkdir()
    proc = _run(str(tmp_path))
    assert proc.returncode == 2
    assert "already holds a check: give a new folder" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
