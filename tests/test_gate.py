"""The CI performance gate (benchmarks/scripts/gate.py): its verdicts, and real asv runs on two
commits of a small git repository whose only change is a worse counter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from benchmarks.scripts.gate import compare, judge, kind_of

REPO = Path(__file__).resolve().parents[1]
COUNTER = "loading.LoaderCosts.track_chunks_decoded('small', 'numpy')"
RMSE = "cases.CaseResult.track_test_rmse('torch-mlp', 'tiny')"
TIME = "loading.LoaderEpoch.time_epoch('ts', 'numpy')"
RATIO = "loading.LoaderCosts.track_ratio_to_raw('map', 'tf')"


def test_kinds_follow_the_benchmark_names():
    assert kind_of(COUNTER) == "exact"
    assert kind_of("loading.LoaderCosts.track_bytes_read") == "exact"
    assert kind_of(RMSE) == "accuracy"
    assert kind_of(TIME) == "timing"
    assert kind_of("loading.LoaderEpoch.peakmem_epoch('ts', 'torch')") == "timing"
    assert kind_of(RATIO) == "timing"
    assert kind_of("cases.Other.track_something") == "info"


def test_identical_results_pass():
    results = {COUNTER: 45.0, RMSE: 2.7446116803387963, TIME: 2.5, RATIO: 0.5}
    verdicts = compare(results, dict(results))
    assert [v.benchmark for v in verdicts] == sorted(results)
    assert not any(v.failed for v in verdicts)


def test_a_worse_counter_fails_by_one_and_a_better_one_passes():
    assert judge(COUNTER, 45, 46).failed
    assert judge(COUNTER, 45, 46).why == "counter grew"
    assert not judge(COUNTER, 45, 44).failed
    assert judge("x.LoaderCosts.track_read_amplification('ts', 'tf')", 1.0, 1.0001).failed


def test_rmse_may_move_within_the_tolerance_only():
    assert not judge(RMSE, 2.0, 2.019, rmse_tolerance=0.01).failed
    assert judge(RMSE, 2.0, 2.021, rmse_tolerance=0.01).failed
    assert not judge(RMSE, 2.0, 1.5).failed


def test_timings_fail_only_beyond_the_factor_in_their_direction():
    assert not judge(TIME, 1.0, 2.9, factor=3).failed
    assert judge(TIME, 1.0, 3.1, factor=3).failed
    # higher is better for the loader's ratio to raw decode and for samples/s
    assert not judge(RATIO, 0.5, 5.0, factor=3).failed
    assert not judge(RATIO, 0.5, 0.2, factor=3).failed
    assert judge(RATIO, 0.5, 0.1, factor=3).failed


def test_a_benchmark_broken_on_head_fails_and_a_new_one_passes():
    assert judge(TIME, 1.0, None).why == "fails on HEAD"
    assert judge(TIME, None, None).failed
    assert judge(TIME, None, 1.0).why == "fixed on HEAD"
    assert not judge(TIME, None, 1.0).failed
    (new,) = compare({}, {COUNTER: 3.0})
    assert new.why == "new" and not new.failed
    (broken,) = compare({}, {COUNTER: None})
    assert broken.failed


# --- end to end: real asv on a two-commit repository -------------------------------------------

TOY_BENCHMARKS = """
import toy

def track_chunks_decoded():
    return toy.CHUNKS

def track_test_rmse():
    return toy.RMSE

def time_sum():
    sum(range(1000))

class Param:
    params = ["tiny", "small"]

    def track_chunks_decoded(self, preset):
        return toy.CHUNKS if preset == "tiny" else 10 * toy.CHUNKS
"""
# as CI selects: some parameter sets only (asv keeps NaN for the others)
SELECTION = ["--bench", r"^bench\.[a-z]", "--bench", r"Param.*'tiny'"]


def _git(repo: Path, *args: str) -> str:
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo: Path, chunks: int, rmse: float, message: str) -> str:
    (repo / "src" / "toy" / "__init__.py").write_text(f"CHUNKS = {chunks}\nRMSE = {rmse}\n")
    (repo / "notes.txt").write_text(message)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("toy")
    (repo / "src" / "toy").mkdir(parents=True)
    (repo / "benchmarks").mkdir()
    (repo / "benchmarks" / "__init__.py").write_text("")
    (repo / "benchmarks" / "bench.py").write_text(TOY_BENCHMARKS)
    (repo / "asv.conf.json").write_text(
        textwrap.dedent("""\
        {
            // comments as in cubebench's own configuration
            "version": 1, "project": "toy", "repo": ".", "branches": ["main"],
            "environment_type": "virtualenv", "benchmark_dir": "benchmarks"
        }
        """)
    )
    _git(repo, "init", "-q", "-b", "main")
    return repo


def _gate(repo: Path, base: str, head: str) -> subprocess.CompletedProcess:
    """The gate on the toy repository. Its timing is a 10 µs sum that a busy machine makes
    3x slower between two commits now and then (seen in CI: "3 of 4 got worse"), so the
    timing factor is set out of reach here; the factor's rule is tested on its own above,
    and this test checks that a real timing is measured and reported on both commits."""
    cmd = [sys.executable, "-m", "benchmarks.scripts.gate", "--config", str(repo / "asv.conf.json")]
    cmd += ["--base", base, "--head", head, "--factor", "1e9", *SELECTION]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _table(gate: subprocess.CompletedProcess) -> list[str]:
    """The gate's verdict table (asv's own output comes before it)."""
    table = gate.stdout.split("(HEAD)\n", 1)[1].splitlines()
    return [line for line in table if not line.startswith("gate:")]


@pytest.mark.slow
def test_gate_runs_asv_on_both_commits_and_fails_only_on_the_worse_counter(toy_repo):
    first = _commit(toy_repo, 45, 2.5, "first")
    same = _commit(toy_repo, 45, 2.5, "a change that costs nothing")
    worse = _commit(toy_repo, 46, 2.5, "decodes one chunk more")

    passed = _gate(toy_repo, first, same)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "4 benchmarks, none got worse" in passed.stdout
    rows = {line.split()[0]: line.split()[1:5] for line in _table(passed)[1:]}
    timing = rows.pop("bench.time_sum")  # a real timing on each commit: positive, not equal
    assert timing[0] == "timing" and float(timing[1]) > 0 and float(timing[2]) > 0
    # the ratio is printed with 3 decimals: within half of the last one (a relative tolerance
    # failed whenever noise made HEAD's sum several times faster, a ratio below 0.25)
    assert float(timing[3]) == pytest.approx(float(timing[2]) / float(timing[1]), abs=5.1e-4)
    assert rows == {
        "bench.Param.track_chunks_decoded('tiny')": ["exact", "45", "45", "1.000"],
        "bench.track_chunks_decoded": ["exact", "45", "45", "1.000"],
        "bench.track_test_rmse": ["accuracy", "2.5", "2.5", "1.000"],
    }

    failed = _gate(toy_repo, same, worse)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "2 of 4 benchmarks got worse" in failed.stderr
    flagged = [line for line in _table(failed) if line.startswith("FAIL")]
    assert sorted(line.split()[1] for line in flagged) == [
        "bench.Param.track_chunks_decoded('tiny')",
        "bench.track_chunks_decoded",
    ]
    assert all(line.endswith("counter grew") for line in flagged)
    # the gate's worktrees are gone again
    assert _git(toy_repo, "worktree", "list").count("\n") == 0
