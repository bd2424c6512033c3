"""Torch DDP through torchrun (`cubebench run --nproc 2`): real gloo ranks on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cubebench.loading import ChunkStream, LoadStats
from cubebench.metrics import RegressionMetrics
from fake_cases import mean_case

pytestmark = pytest.mark.slow

RECORDER = textwrap.dedent('''
    import os
    import signal
    import numpy as np
    from cubebench import ranks
    from cubebench.case import Case as Base

    class Case(Base):
        """Saves every training sample its rank is dealt, two epochs; predicts the mean."""
        name = "recorder"
        library = "torch"
        distributed = True
        parameters = {"epochs": 2}

        def fit(self):
            stream = self.context.stream("train")
            rank, world = self.context.rank, self.context.world_size
            record = os.environ["RECORD_DIR"]
            if "FAIL_RANK" in os.environ:
                broken = int(os.environ["FAIL_RANK"])
                if rank != broken:  # a peer outlives torchrun's SIGTERM, so it fails of the
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # broken connection
                ranks.total(0)  # (a barrier: the peer ignores SIGTERM before anyone breaks)
                if rank == broken and os.environ.get("FAIL_HOW") == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does
                if rank == broken:
                    raise ValueError(f"only rank {rank} breaks")
            for epoch in range(2):
                rows = [np.column_stack([x, y]) for x, y in stream.batches(epoch)]
                rows = np.concatenate(rows) if rows else np.empty((0, 0))
                np.save(f"{record}/r{rank}of{world}e{epoch}.npy", rows)
                try:
                    (samples,) = ranks.total(len(rows))  # the case logs what all ranks saw
                except Exception as error:
                    open(f"{record}/r{rank}-broke", "w").write(repr(error))
                    raise
                self.context.log_epoch(epoch, 1.0, samples=int(samples), seconds=0.1, of=2)

        def predict(self, x):
            return np.zeros(len(x))
''')


def _run(
    tmp_path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, dict]:
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "recorder.py").write_text(RECORDER)
    (cases / "mean.py").write_text(mean_case())  # not distributed: one process, as usual
    record = tmp_path / "record"
    record.mkdir()

    proc = subprocess.run(
        [
            *(sys.executable, "-m", "cubebench", "run", "--cube", "synthetic:tiny"),
            *("--no-tracking", "--out", str(tmp_path / "out"), "--run-id", "ddp"),
            *("--threads", "2", *args),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "RECORD_DIR": str(record), **(env or {})},
        timeout=600,
    )
    results = {
        p.stem: json.loads(p.read_text())
        for p in (tmp_path / "out" / "ddp").glob("*.json")
        if p.name not in ("run.json", "environment.json")
    }
    return proc, results


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def test_two_ranks_cover_every_training_sample_once(tmp_path, tiny_task):
    """Each epoch, the two ranks' shares together are the training part, each sample once,
    and the test metrics merged over the ranks equal numpy's on the whole test part."""
    proc, results = _run(tmp_path, "--cases-dir", str(tmp_path / "cases"), "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = results["recorder"]
    assert result["status"] == "ok" and result["world_size"] == 2 and result["threads"] == 1
    assert results["mean"]["world_size"] == 1 and results["mean"]["threads"] == 2
    whole = _sorted_rows(
        np.concatenate(
            [np.column_stack([x, y]) for x, y in ChunkStream(tiny_task, "train").batches(0)]
        )
    )
    assert len(whole) == tiny_task.samples["train"]
    record = tmp_path / "record"
    for epoch in range(2):
        shares = [np.load(record / f"r{r}of2e{epoch}.npy") for r in range(2)]
        assert all(len(s) > 0 for s in shares)  # both ranks trained
        np.testing.assert_array_equal(_sorted_rows(np.concatenate(shares)), whole)
        assert result["epochs"][epoch]["samples"] == len(whole)  # summed over the ranks
    test_y = np.concatenate(
        [y for _, y in ChunkStream(tiny_task, "test", shuffle=False).batches(0)]
    ).astype(np.float64)
    expected_rmse = tiny_task.target_std * np.sqrt(np.mean(test_y**2))
    assert result["metrics"]["n"] == tiny_task.samples["test"]
    assert result["metrics"]["rmse"] == pytest.approx(expected_rmse, rel=1e-6)


def test_a_failing_rank_fails_the_case_with_its_reason(tmp_path):
    """Rank 0 fails too, after rank 1 and because of it (a broken connection); the result
    gives rank 1's reason, whichever rank finished last."""
    proc, results = _run(
        tmp_path,
        "--cases-dir",
        str(tmp_path / "cases"),
        "--cases",
        "recorder",
        "--nproc",
        "2",
        env={"FAIL_RANK": "1"},
    )
    assert proc.returncode != 0  # the suite says a case failed
    result = results["recorder"]
    assert result["status"] == "failed"
    assert result["reason"] == "rank 1: ValueError: only rank 1 breaks"
    assert result["world_size"] == 2
    assert (tmp_path / "record" / "r0-broke").exists()  # the peer's failure came and lost
    assert not list((tmp_path / "out" / "ddp" / "specs").glob(".ranks-*"))


def test_a_killed_rank_is_the_reason_not_the_peer_it_broke(tmp_path):
    """Rank 1 dies of SIGKILL and writes nothing; rank 0 then fails of the broken connection
    and writes its failure. The reason is rank 1's death."""
    proc, results = _run(
        tmp_path,
        *("--cases-dir", str(tmp_path / "cases"), "--cases", "recorder", "--nproc", "2"),
        env={"FAIL_RANK": "1", "FAIL_HOW": "kill"},
    )
    assert proc.returncode != 0
    result = results["recorder"]
    assert result["status"] == "failed"
    assert result["reason"].endswith("rank 1: killed by SIGKILL (out of memory?)"), result
    assert (tmp_path / "record" / "r0-broke").exists()  # the peer's failure came and lost


def test_torch_cases_train_with_ddp_and_their_loss_decreases(tmp_path, tiny_task):
    """The real torch cases on 2 gloo ranks: one result each, recording the world size; the
    loss over every rank's samples goes down."""
    proc, results = _run(
        tmp_path, "--cases", "torch-mlp,torch-cnn", "--nproc", "2", "--epochs", "3"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("torch-mlp", "torch-cnn"):
        result = results[name]
        assert result["status"] == "ok", result["reason"]
        assert result["world_size"] == 2 and result["threads"] == 1
        losses = [e["train_loss"] for e in result["epochs"]]
        assert len(losses) == 3 and losses[-1] < losses[0], losses
        assert np.isfinite(result["metrics"]["rmse"])
    mlp = results["torch-mlp"]
    assert all(e["samples"] == tiny_task.samples["train"] for e in mlp["epochs"])
    assert mlp["metrics"]["n"] == tiny_task.samples["test"]
    assert mlp["throughput"]["train_samples"] == 3 * tiny_task.samples["train"]


LR_RECORDER = textwrap.dedent('''
    import json, os
    from pathlib import Path
    import torch
    from cubebench.discovery import load_case_class

    Base = load_case_class(Path(os.environ["REPO_CASES"]) / "torch_mlp.py")

    class Case(Base):
        """torch-mlp, recording the learning rate after every training step of its rank
        (not the warm-up's nor the probe's steps, which are put back)."""
        name = "lr-recorder"
        parameters = {**Base.parameters, "batch_size": 512, "min_lr_fraction": 0.1}

        def fit(self):
            seen, step = [], torch.optim.lr_scheduler.LambdaLR.step
            clock = self.context.clock

            def recording(scheduler, *args, **kwargs):
                step(scheduler, *args, **kwargs)
                if clock.active is None:
                    seen.append(scheduler.get_last_lr()[0])

            torch.optim.lr_scheduler.LambdaLR.step = recording
            try:
                super().fit()
            finally:
                torch.optim.lr_scheduler.LambdaLR.step = step
            record = Path(os.environ["RECORD_DIR"]) / f"lr{self.context.rank}.json"
            record.write_text(json.dumps(seen))
''')


def test_ranks_follow_one_schedule(tmp_path, tiny_task):
    """On 2 ranks every rank takes ceil(train samples / global batch) steps per epoch and the
    same learning rates, ending at `min_lr_fraction` of the initial rate."""
    repo_cases = Path(__file__).resolve().parents[1] / "cases"
    cases = tmp_path / "lr-cases"
    cases.mkdir()
    (cases / "lr_recorder.py").write_text(LR_RECORDER)
    batch, epochs, alpha = 512, 2, 0.1
    proc, results = _run(
        tmp_path,
        *("--cases-dir", str(cases), "--nproc", "2", "--epochs", str(epochs)),
        env={"REPO_CASES": str(repo_cases)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = results["lr-recorder"]
    assert result["status"] == "ok", result["reason"]
    steps = -(-tiny_task.samples["train"] // (2 * batch))
    assert [e["steps"] for e in result["epochs"]] == [steps] * epochs
    rates = [json.loads((tmp_path / "record" / f"lr{r}.json").read_text()) for r in range(2)]
    assert len(rates[0]) == epochs * steps
    assert rates[0] == rates[1]  # one schedule
    lr = result["params"]["learning_rate"]
    assert rates[0][-1] == pytest.approx(alpha * lr, rel=1e-9)
    assert rates[0][0] < lr and all(b <= a for a, b in zip(rates[0], rates[0][1:]))


def test_metrics_merged_from_parts_equal_numpy():
    """What the ranks' shares of the test part give together is numpy's formula on all of it,
    also when the parts' values (and so their shifts) differ widely."""
    rng = np.random.default_rng(0)
    true = np.concatenate([rng.normal(280, 5, 1000), rng.normal(310, 20, 700), [250.0]])
    pred = true + rng.normal(0.5, 2, len(true))
    parts = []
    for idx in np.array_split(np.arange(len(true)), [1000, 1700]):
        m = RegressionMetrics()
        m.update(true[idx], pred[idx])
        parts.append(m)
    merged = parts[0].merge(RegressionMetrics()).merge(parts[1]).merge(parts[2])
    got = merged.result()
    err = pred - true
    assert got["n"] == len(true)
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-12)
    assert got["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-12)
    assert got["bias"] == pytest.approx(np.mean(err), rel=1e-10)
    r2 = 1 - np.sum(err**2) / np.sum((true - true.mean()) ** 2)
    assert got["r2"] == pytest.approx(r2, rel=1e-12)
    assert RegressionMetrics().merge(parts[1]).result() == parts[1].result()


def test_load_stats_add_sums_counters_and_keeps_the_first_batch_time():
    a = LoadStats(chunks_decoded=2, bytes_decoded=10, bytes_needed=10, samples=5)
    b = LoadStats(
        chunks_decoded=3, bytes_decoded=30, bytes_needed=15, samples=7, time_to_first_batch_s=0.5
    )
    total = LoadStats() + a + b
    assert (total.chunks_decoded, total.samples, total.bytes_decoded) == (5, 12, 40)
    assert total.read_amplification == 40 / 25
    assert total.time_to_first_batch_s == 0.5
