"""`bench-loader`'s measurement (issue: keeping an accelerator fed): the reference is the
irreducible work, the ratio comes from alternating pairs with an interval and a stopping rule,
the emulated accelerator's utilisation is busy / wall, the sweep finds the highest rate kept
at 90 %, and `--threads a,b` gives one row per count."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from cubebench.loading import ChunkStream
from cubebench.loading.bench import (
    TARGET_UTILISATION,
    EpochRun,
    Reference,
    _emulated,
    _python_epochs,
    converged,
    ratio_interval,
    sweep,
)
from cubebench.loading.readers import available_readers, open_reader


def test_ratio_interval_is_the_geometric_mean_with_a_t_interval():
    logs = [math.log(r) for r in (0.5, 0.55, 0.45, 0.5)]
    ratio, low, high = ratio_interval(logs)
    assert ratio == pytest.approx(math.exp(np.mean(logs)))
    half = 3.182446305284263 * np.std(logs, ddof=1) / 2  # t(0.975, 3)
    assert (low, high) == pytest.approx((ratio * math.exp(-half), ratio * math.exp(half)))
    one = ratio_interval([math.log(0.5)])
    assert one[0] == pytest.approx(0.5) and math.isnan(one[1]) and math.isnan(one[2])


def test_the_pairs_stop_when_the_interval_is_within_ten_percent():
    assert not converged([math.log(0.5)])  # one pair: no interval
    assert converged([math.log(r) for r in (0.50, 0.51, 0.49, 0.50)])
    assert not converged([math.log(r) for r in (0.3, 0.7, 0.5)])  # too wide


@pytest.mark.parametrize("reader", ["direct", "tensorstore", "zarr"])
def test_the_reference_counts_the_parts_pairs_without_extracting(tiny_task, reader):
    """Every reader's reference counts exactly the part's samples; the extracting one too."""
    stream = ChunkStream(tiny_task, "val", threads=2)
    ref = Reference(stream, open_reader(tiny_task.cube, reader, threads=2))
    pairs, seconds = ref.run()
    assert pairs == tiny_task.samples["val"] and seconds > 0
    extract = Reference(stream, ref.reader, extract=True)
    assert extract.run()[0] == pairs
    assert reader in available_readers(tiny_task.cube)


def _slow_loader(batches: int, delay: float, size: int = 100):
    """A loader that needs `delay` seconds per batch (a sleep: it holds no core)."""

    def iterate(index: int):
        for _ in range(batches):
            time.sleep(delay)
            yield np.empty((size, 2), np.float32), np.empty(size, np.float32)

    return iterate


def test_utilisation_is_busy_over_wall():
    """A device step as long as the loader's delay keeps the device busy half the time; a
    loader with no delay, nearly all the time. Sleeps, so a busy machine does not change it
    much; the bounds leave room for sleep overshoot."""
    size, delay = 100, 0.02
    rate = size / delay  # each batch held for `delay`
    half = _emulated(_python_epochs(_slow_loader(10, delay, size), 1 / rate), rate, 1)
    assert 0.35 < half["accelerator_utilisation"] < 0.55
    fed = _emulated(_python_epochs(_slow_loader(10, 0.0, size), 1 / rate), rate, 1)
    assert fed["accelerator_utilisation"] > 0.9
    # the rate really emulated: items over the time held, at most the rate asked for
    assert fed["emulated_rate"] <= rate * 1.0001
    assert fed["emulated_rate"] > rate * 0.5


def test_an_epoch_counts_items_and_hold():
    run = _python_epochs(_slow_loader(3, 0.0, 50), 0.001)(0)
    assert isinstance(run, EpochRun)
    assert run.items == 150 and run.busy >= 0.15 and run.first is not None


def test_sweep_reports_the_highest_rate_that_passed(tiny_task):
    found = sweep(tiny_task, batch_size=512, threads=1, probes=3)
    passed = [
        p["rate"] for p in found["points"] if p["accelerator_utilisation"] >= TARGET_UTILISATION
    ]
    assert found["sustained_rate_at_90"] == max(passed)
    rates = [p["rate"] for p in found["points"]]
    assert rates == sorted(rates) and len(rates) >= 4  # the start, then three bisections
    low, high = found["bracket"]
    assert low < high and found["free_running_per_s"] > 0
    for point in found["points"]:
        assert 0 < point["accelerator_utilisation"] <= 1


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cubebench", "bench-loader", "--cube", "synthetic:tiny", *args],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=600,
    )


@pytest.mark.slow
def test_threads_give_one_row_per_count_with_the_emulated_rate(tiny_task):
    text = _cli("--threads", "1,2", "--epochs", "2", "--max-seconds", "0")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["threads", "1"], ["threads", "2"]]
    proc = _cli(
        "--threads", "1,2", "--epochs", "2", "--max-seconds", "0", "--emulate-rate", "1e6", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [row["threads"] for row in rows] == [1, 2]
    for row in rows:
        assert row["pairs"] == 2 * tiny_task.samples["train"]
        assert row["rate"] == 1e6 and 0 < row["accelerator_utilisation"] <= 1
        assert row["emulated_rate"] <= 1e6 * 1.0001


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--adapter", "tf", "--emulate-rate", "1000"], "numpy or torch"),
        (["--emulate-rate", "fast"], "not a number"),
        (["--threads", "2,0"], "above 0"),
        (["--max-seconds", "-1"], ">= 0"),
    ],
)
def test_bad_feeding_options_are_one_line(args, says):
    proc = _cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cubebench: error: ") and says in lines[0]
