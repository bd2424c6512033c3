"""Runs one case in its own process: `python -m cubebench.worker SPEC.json`.

The runner starts one worker per case, so a crash, a hang or a leak costs only that case, and
no framework state (threads, CUDA contexts, TensorFlow's graph) leaks from one case into the
next. The worker writes the case's result file itself (atomically), also when the case
raises; stdout carries one JSON progress event per line for the runner's progress bars.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cubebench import ranks, results
from cubebench.case import Case, Context
from cubebench.metrics import RegressionMetrics
from cubebench.redact import scrub

# storage options travel in the environment, never in a file: they may hold credentials
STORAGE_OPTIONS_ENV = "CUBEBENCH_STORAGE_OPTIONS"
RUNNER_PID_ENV = "CUBEBENCH_RUNNER_PID"
RANK_RESULTS_ENV = "CUBEBENCH_RANK_RESULTS"  # where DDP ranks leave results for their launcher
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


def _cuda_present() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def resolve_device(requested: str, devices: tuple[str, ...]) -> str:
    if requested == "auto":
        return "cuda" if "cuda" in devices and _cuda_present() else "cpu"
    if requested not in devices:
        raise RuntimeError(f"runs on {', '.join(devices)} only, not {requested}")
    return requested


def evaluate(case: Case, context: Context) -> tuple[dict, float, int]:
    """Every predictor of the case on its eval part, in physical units.

    Returns (metrics of the first predictor + `by_predictor`, seconds the first predictor
    took, samples). Predictions are denormalised with the train-only statistics. On windows
    (patch tasks), the metrics cover the pixels to fill (the batch's mask) and the samples
    are windows.
    """
    task = context.task
    mean, std = task.target_mean, task.target_std
    by_predictor: dict[str, dict] = {}
    first_seconds = 0.0
    n = 0
    for i, (name, predict) in enumerate(case.predictors().items()):
        stream = context.stream(case.eval_part, shuffle=False)
        metrics = RegressionMetrics()
        seconds, samples = 0.0, 0
        for x, y, *mask in stream.batches(0):
            samples += len(x)
            start = time.perf_counter()
            y_hat = np.asarray(predict(x), np.float64).reshape(-1)
            seconds += time.perf_counter() - start
            y = y.reshape(-1)
            if mask:  # windows: only the pixels to fill count
                keep = mask[0].reshape(-1) > 0
                y, y_hat = y[keep], y_hat[keep]
            metrics.update(y * std + mean, y_hat * std + mean)
        # DDP: each rank evaluated its share; the ranks predicted in parallel
        shares = ranks.gather((metrics, seconds, samples))
        metrics = functools.reduce(RegressionMetrics.merge, (m for m, _, _ in shares))
        seconds = max(s for _, s, _ in shares)
        samples = sum(n for _, _, n in shares)
        by_predictor[name] = metrics.result(task.noise_floor)
        if i == 0:
            first_seconds, n = seconds, samples
    first = next(iter(by_predictor.values()))
    rmse = {name: m["rmse"] for name, m in by_predictor.items()}
    return (
        {
            **first,
            "units": task.target_units,
            "eval_part": case.eval_part,
            "by_predictor": by_predictor,
            **case.extra_metrics(rmse),
        },
        first_seconds,
        n,
    )


def library_version(name: str) -> str | None:
    from importlib import metadata

    for candidate in (name, f"{name}-cpu"):  # tensorflow-cpu provides tensorflow
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


def epoch_rows(context: Context) -> list[dict]:
    """The epochs a case logged, as rows of its result."""
    return [{k: v for k, v in asdict(e).items() if k != "extra"} | e.extra for e in context.epochs]


def throughput_record(
    context: Context, fit: float, n_eval: int, predict_seconds: float
) -> dict[str, Any]:
    """Training and inference samples per second of a fitted and evaluated case."""
    train = context.train_samples or sum(e.samples for e in context.epochs) or None
    return {
        "train_samples": train,
        "train_samples_per_s": train / fit if train and fit else None,
        "predict_samples_per_s": n_eval / predict_seconds if predict_seconds else None,
    }


def loading_record(context: Context, fit: float) -> dict[str, Any]:
    """What the case's training streams cost: stall, read amplification, bytes, decode time
    (summed over DDP ranks; the stall fraction is the ranks' mean)."""
    shares = ranks.gather(context.loading())
    loading = sum(shares[1:], shares[0])
    used_streams = bool(context.train_streams)
    stall = loading.stall_seconds / (fit * len(shares)) if fit else 0.0
    return {
        "stall_fraction": min(1.0, stall) if used_streams else None,
        "stall_method": (
            ("estimated" if context.stall_estimated else "measured") if used_streams else None
        ),
        "read_amplification": loading.read_amplification if loading.bytes_needed else None,
        "chunks_decoded": loading.chunks_decoded,
        "bytes_read": loading.bytes_read,
        "bytes_decoded": loading.bytes_decoded,
        "decode_s": round(loading.decode_seconds, 4),
        "time_to_first_batch_s": loading.time_to_first_batch_s,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpu_peak_mb(device: str) -> float | None:
    if device != "cuda" or "torch" not in sys.modules:
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def run(spec: dict) -> dict:
    """Run the case described by `spec` (written by the runner); return its result."""
    from cubebench.cube import open_cube
    from cubebench.runner import load_case_class
    from cubebench.task import get_task, prepare_task

    started = time.perf_counter()
    seed, threads = int(spec["seed"]), int(spec["threads"])
    random.seed(seed)
    np.random.seed(seed)
    cls = load_case_class(Path(spec["case_path"]))
    params = {**cls.parameters, **spec.get("params", {})}
    result: dict[str, Any] = {
        "schema_version": results.SCHEMA_VERSION,
        "run_id": spec["run_id"],
        "case": cls.name,
        "library": cls.library,
        "library_version": library_version(cls.library),
        "task": cls.task,
        "status": "failed",
        "reason": None,
        "device": "cpu",
        "params": params,
        "seed": seed,
        "threads": threads,
        "world_size": ranks.world_size(),
        "started_at": results.now(),
        "metrics": None,
        "timing": {"warmup_s": None, "fit_s": None, "predict_s": None, "total_s": None},
        "throughput": {
            "train_samples_per_s": None,
            "predict_samples_per_s": None,
            "train_samples": None,
        },
        "loading": {"stall_fraction": None, "read_amplification": None},
        "memory": {"peak_rss_mb": None, "gpu_peak_mb": None},
        "epochs": [],
        "cube": {"spec": scrub(spec["cube"]), "fingerprint": None, "chunk_shape": None},
        "environment": spec["environment"],
    }
    context: Context | None = None
    try:
        result["device"] = device = resolve_device(spec["device"], cls.devices)
        ranks.start(device)
        emit("phase", phase="preparing the task")
        storage_options = json.loads(os.environ.get(STORAGE_OPTIONS_ENV) or "null")
        cube = open_cube(spec["cube"], storage_options)
        task = prepare_task(get_task(cls.task), cube)  # the split is part of the task
        result["cube"].update(fingerprint=task.fingerprint, chunk_shape=list(task.chunk_shape))
        result["timing"]["prepare_s"] = round(time.perf_counter() - started, 3)

        def on_epoch(record, of):
            emit("epoch", epoch=record.epoch, of=of, train_loss=record.train_loss)

        context = Context(
            task,
            params,
            device=device,
            seed=seed,
            threads=threads,
            tensorboard_dir=spec.get("tensorboard_dir") if ranks.rank() == 0 else None,
            on_epoch=on_epoch,
        )
        case = cls(context)
        emit("phase", phase="setting up")
        start = time.perf_counter()
        case.setup()
        warmup = time.perf_counter() - start
        emit("phase", phase="training")
        start = time.perf_counter()
        case.fit()
        fit = time.perf_counter() - start
        emit("phase", phase="evaluating")
        metrics, predict_seconds, n_eval = evaluate(case, context)
        result.update(status="ok", metrics=metrics, epochs=epoch_rows(context))
        result["timing"].update(
            warmup_s=round(warmup, 4), fit_s=round(fit, 4), predict_s=round(predict_seconds, 4)
        )
        result["throughput"].update(throughput_record(context, fit, n_eval, predict_seconds))
        result["loading"] = loading_record(context, fit)
        peak_rss = sum(ranks.gather(_peak_rss_mb()))  # every rank's footprint
    except Exception as error:  # the case failed: say why in one line, keep the traceback
        sys.stderr.write(scrub(traceback.format_exc()))  # the log keeps the traceback
        where = f"rank {ranks.rank()}: " if ranks.world_size() > 1 else ""
        result["reason"] = scrub(f"{where}{type(error).__name__}: {error}".splitlines()[0][:500])
        peak_rss = _peak_rss_mb()
    finally:
        if context is not None:
            context.close()  # the event files are complete before the result says so
    result["memory"] = {
        "peak_rss_mb": round(peak_rss, 1),
        "gpu_peak_mb": _gpu_peak_mb(result["device"]),
    }
    result["timing"]["total_s"] = round(time.perf_counter() - started, 3)
    result["finished_at"] = results.now()
    return result


def launch_ranks(spec_path: Path, nproc: int) -> int:
    """Start `nproc` ranks of this worker through torchrun (`torch.distributed.run`), in this
    process: the ranks die with it as it dies with the runner, and the runner's timeout and
    kill reach them the same way. The ranks leave their results here, and this process writes
    the case's one result: rank 0's, or, when ranks failed, the first failure's."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    from cubebench.runner import exit_reason

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
