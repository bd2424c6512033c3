"""Runs one case in its own process: `python -m cubebench.worker SPEC.json`.

The runner starts one worker per case, so a crash, a hang or a leak costs only that case, and
no framework state (threads, CUDA contexts, TensorFlow's graph) leaks from one case into the
next. The worker writes the case's result file itself (atomically), also when the case
raises; stdout carries one JSON progress event per line for the runner's progress bars.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cubebench import ranks, results
from cubebench.discovery import load_case_class
from cubebench.measure import run_case
from cubebench.processes import (
    RANK_RESULTS_ENV,
    RUNNER_PID_ENV,
    STORAGE_OPTIONS_ENV,
    exit_reason,
)

PR_SET_PDEATHSIG = 1


def die_with_runner() -> None:
    """Ask Linux to SIGKILL this worker when the runner dies, SIGKILL included: an orphaned
    case must not go on writing into a run that `cubebench run --resume` will complete."""
    runner = int(os.environ.get(RUNNER_PID_ENV) or 0)
    if not runner or not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != runner:  # the runner died before the request was in place
        os._exit(1)


def emit(event: str, **fields: Any) -> None:
    """One progress event for the runner; under DDP rank 0 speaks for all ranks."""
    if ranks.rank() == 0:
        print(json.dumps({"event": event, **fields}), flush=True)


def run(spec: dict) -> dict:
    """Run the case described by `spec` (written by the runner); return its result."""
    cls = load_case_class(Path(spec["case_path"]))

    def on_epoch(record, of):
        emit("epoch", epoch=record.epoch, of=of, train_loss=record.train_loss)

    measured = run_case(
        cls,
        spec["cube"],
        run_id=spec["run_id"],
        name=spec["case"],  # a variant's own name under `--param`
        task_choice=spec.get("task_choice"),
        params=spec.get("params", {}),
        device=spec["device"],
        seed=int(spec["seed"]),
        split_seed=spec.get("split_seed"),
        split=spec.get("split"),
        buffer=spec.get("buffer"),
        repeat=int(spec.get("repeat", 0)),
        threads=int(spec["threads"]),
        environment=spec["environment"],
        storage_options=json.loads(os.environ.get(STORAGE_OPTIONS_ENV) or "null"),
        tensorboard_dir=spec.get("tensorboard_dir"),
        on_phase=lambda phase: emit("phase", phase=phase),
        on_epoch=on_epoch,
    )
    return measured.result


def launch_ranks(spec_path: Path, nproc: int) -> int:
    """Start `nproc` ranks of this worker through torchrun (`torch.distributed.run`), in this
    process: the ranks die with it as it dies with the runner, and the runner's timeout and
    kill reach them the same way. The ranks leave their results here, and this process writes
    the case's one result: rank 0's, or, when ranks failed, the first failure's."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    os.environ[RUNNER_PID_ENV] = str(os.getpid())  # each rank dies with this launcher
    os.environ["PYTHONSAFEPATH"] = "1"  # as `python -P`: no import from the start directory
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ranks talk over loopback only
    args = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            "--module",
            "cubebench.worker",
            str(spec_path),
        ]
    )
    result_path = Path(json.loads(spec_path.read_text())["result_path"])
    with tempfile.TemporaryDirectory(prefix=".ranks-", dir=spec_path.parent) as rank_dir:
        os.environ[RANK_RESULTS_ENV] = rank_dir
        try:
            torchrun(args)
            code, killed = 0, []
        except ChildFailedError as error:
            # SIGKILL is the OOM killer's mark: torchrun stops the other ranks with SIGTERM
            failures = error.failures
            killed = sorted(r for r, f in failures.items() if f.exitcode == -signal.SIGKILL)
            rank = killed[0] if killed else error.get_first_failure()[0]
            exitcode = failures[rank].exitcode
            how = exit_reason(exitcode, "") if exitcode < 0 else f"exited with code {exitcode}"
            print(f"rank {rank}: {how}", file=sys.stderr, flush=True)  # the runner's reason
            code = 1
        result = _case_result(Path(rank_dir), code, killed)
        if result is not None:  # else the runner reports the exit, as for any dead worker
            results.write_json_atomic(result_path, result)
    return code


def _case_result(rank_dir: Path, code: int, killed: list[int]) -> dict | None:
    """The first failure any rank wrote, else rank 0's result when every rank succeeded; None
    when a rank was killed (SIGKILL) before it could write: that is the cause, and the
    launcher's last line says it.

    The first, not the last: when one rank fails, its peers fail after it with a broken
    connection ("Connection closed by peer"), which says nothing of the cause."""
    written = [json.loads(p.read_text()) for p in sorted(rank_dir.glob("*.json"))]
    if set(killed) - {w["rank"] for w in written}:
        return None
    failed = [w for w in written if w["result"]["status"] == "failed"]
    if failed:
        return min(failed, key=lambda w: w["written_ns"])["result"]
    ok = [w["result"] for w in written if w["rank"] == 0]
    return ok[0] if ok and code == 0 else None


def _write_rank_result(result: dict) -> None:
    """Leave this rank's result for the launcher, stamped before this rank's connections
    close, so a failure is stamped before the failures it causes in its peers."""
    rank = ranks.rank()
    stamped = {"rank": rank, "written_ns": time.monotonic_ns(), "result": result}
    results.write_json_atomic(Path(os.environ[RANK_RESULTS_ENV]) / f"{rank}.json", stamped)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_runner()
    spec = json.loads(Path(argv[0]).read_text())
    nproc = int(spec.get("nproc", 1))
    if nproc > 1 and "RANK" not in os.environ:
        return launch_ranks(Path(argv[0]), nproc)
    result = run(spec)
    try:
        results.validate(result)
        if ranks.world_size() == 1:
            results.write_json_atomic(Path(spec["result_path"]), result)
        elif ranks.rank() == 0 or result["status"] == "failed":  # a failed rank says why
            _write_rank_result(result)
        emit("done", status=result["status"], reason=result["reason"])
    finally:
        ranks.stop()
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
