"""What the runner and the worker processes agree on: the environment a worker starts with and
how a process that ended without a result is described. Neither imports the other."""

from __future__ import annotations

import os
import signal

# storage options travel in the environment, never in a file: they may hold credentials
STORAGE_OPTIONS_ENV = "CUBEBENCH_STORAGE_OPTIONS"
RUNNER_PID_ENV = "CUBEBENCH_RUNNER_PID"
RANK_RESULTS_ENV = "CUBEBENCH_RANK_RESULTS"  # where DDP ranks leave results for their launcher

THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
)


def worker_env(threads: int) -> dict[str, str]:
    """The environment of a worker: thread counts fixed before any library starts its pools."""
    env = {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads))}
    env["TF_NUM_INTEROP_THREADS"] = "1"
    # OpenMP threads that spin between parallel regions steal the cores the loader's decode
    # threads need: on 2 cores torch trained 5x slower with the default (active) policy
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def exit_reason(returncode: int, stderr_tail: str) -> str:
    """Why a worker (or a DDP rank) ended without a result: its signal, or its last words."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:  # a real-time signal
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    last = stderr_tail.strip().splitlines()[-1] if stderr_tail.strip() else "no output"
    return f"worker exited with code {returncode}: {last[:300]}"
