"""The suite runner: discovers the cases, runs each in its own process, never stops early.

Each case runs in `python -m cubebench.worker` with its thread count fixed through the usual
environment variables, under a timeout. A case that raises, hangs past its timeout or dies by a
signal (OOM killer, SIGKILL) becomes a failed result with the reason, and the suite goes on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cubebench import results
from cubebench.case import Case
from cubebench.errors import CubebenchError
from cubebench.locks import file_lock
from cubebench.redact import scrub
from cubebench.tracking import SuiteTracker
from cubebench.worker import RUNNER_PID_ENV, STORAGE_OPTIONS_ENV

THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
)


def default_cases_dir() -> Path:
    """`$CUBEBENCH_CASES_DIR`, else `cases/` of the source tree, else `./cases`."""
    if env := os.environ.get("CUBEBENCH_CASES_DIR"):
        return Path(env)
    in_tree = Path(__file__).resolve().parents[2] / "cases"
    return in_tree if in_tree.is_dir() else Path("cases")


def load_case_class(path: Path) -> type[Case]:
    """The `Case` class of one case file (imported by path: cases/ is not a package)."""
    name = f"cubebench_case_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CubebenchError(f"cannot import case file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # a broken case file is a user mistake: one line, no traceback
        del sys.modules[name]
        raise CubebenchError(f"case file {path}: {type(error).__name__}: {error}") from None
    cls = getattr(module, "Case", None)
    if not (isinstance(cls, type) and issubclass(cls, Case)) or not getattr(cls, "name", None):
        raise CubebenchError(f"{path} defines no `Case` class with a name")
    return cls


def discover(cases_dir: Path | None = None) -> dict[str, tuple[Path, type[Case]]]:
    """name -> (file, class) of every case file, in file order."""
    cases_dir = Path(cases_dir or default_cases_dir())
    if not cases_dir.is_dir():
        raise CubebenchError(f"no cases directory at {cases_dir}")
    found: dict[str, tuple[Path, type[Case]]] = {}
    for path in sorted(cases_dir.glob("*.py")):
        if path.name.startswith("_"):
            continue
        cls = load_case_class(path)
        if cls.name in found:
            first = found[cls.name][0]
            raise CubebenchError(f"case {cls.name!r} is defined twice: {first}, {path}")
        found[cls.name] = (path, cls)
    return found


def select(available: dict, wanted: str) -> list[str]:
    if wanted == "all":
        return list(available)
    names = list(dict.fromkeys(n.strip() for n in wanted.split(",") if n.strip()))
    unknown = [n for n in names if n not in available]
    if unknown:
        raise CubebenchError(f"unknown case(s) {unknown}; known: {', '.join(available)}")
    if not names:
        raise CubebenchError("no case selected")
    return names


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


@dataclass
class CaseOutcome:
    case: str
    status: str
    reason: str | None
    seconds: float


Progress = Callable[[str, dict[str, Any]], None]  # (case, worker event) -> None


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


def _tail(path: Path, size: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def worker_env(threads: int) -> dict[str, str]:
    """The environment of a worker: thread counts fixed before any library starts its pools."""
    env = {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads))}
    env["TF_NUM_INTEROP_THREADS"] = "1"
    # OpenMP threads that spin between parallel regions steal the cores the loader's decode
    # threads need: on 2 cores torch trained 5x slower with the default (active) policy
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_case(
    spec: dict,
    run_dir: Path,
    timeout: float,
    progress: Progress | None = None,
    storage_options: dict | None = None,
) -> CaseOutcome:
    """One case in a worker process; returns how it ended (the result file says the rest)."""
    name = spec["case"]
    spec_path = run_dir / "specs" / f"{name}.json"
    results.write_json_atomic(spec_path, spec)
    log_path = run_dir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = worker_env(spec["threads"])
    env[RUNNER_PID_ENV] = str(os.getpid())  # the worker dies with this process (see worker)
    if storage_options:
        env[STORAGE_OPTIONS_ENV] = json.dumps(storage_options)
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            # -P: the current directory is not on the path, so a `numpy.py` there is not run
            [sys.executable, "-P", "-m", "cubebench.worker", str(spec_path)],
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            start_new_session=True,  # its own process group: a timeout kills its children too
        )
        reader = threading.Thread(target=_read_events, args=(proc, name, progress), daemon=True)
        reader.start()
        timed_out = False
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            returncode = proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM of the runner: the case goes with it
            _kill_group(proc)
            proc.wait()
            raise
        _kill_group(proc)  # whatever the case started and left behind
        reader.join(timeout=5)
    seconds = time.perf_counter() - start
    result_path = Path(spec["result_path"])
    if result_path.exists():  # the run dir is new: only this worker wrote it, atomically
        written = json.loads(result_path.read_text())
        return CaseOutcome(name, written["status"], written["reason"], seconds)
    if timed_out:
        reason = f"timed out after {timeout:g} s"
    else:
        reason = exit_reason(returncode, _tail(log_path))
    results.write_json_atomic(result_path, failed_result(spec, reason, seconds))
    return CaseOutcome(name, "failed", reason, seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def _read_events(proc: subprocess.Popen, case: str, progress: Progress | None) -> None:
    """Forward the worker's events; keep draining its stdout whatever happens (a full pipe
    would block the worker)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a library printed to stdout: not ours
        if progress and isinstance(event, dict):
            try:
                progress(case, event)
            except Exception:  # a display problem must not stop the case
                progress = None


def failed_result(spec: dict, reason: str, seconds: float) -> dict:
    """The result of a case whose worker could not write one (timeout, signal, crash)."""
    result = {
        "schema_version": results.SCHEMA_VERSION,
        "run_id": spec["run_id"],
        "case": spec["case"],
        "library": spec["library"],
        "library_version": None,
        "task": spec["task"],
        "status": "failed",
        "reason": reason,
        "device": spec["device"] if spec["device"] != "auto" else "cpu",
        "params": spec["params"],
        "seed": spec["seed"],
        "threads": spec["threads"],
        "world_size": spec.get("nproc", 1),
        "finished_at": results.now(),
        "metrics": None,
        "timing": {"warmup_s": None, "fit_s": None, "predict_s": None, "total_s": seconds},
        "throughput": {"train_samples_per_s": None, "predict_samples_per_s": None},
        "loading": {"stall_fraction": None, "read_amplification": None},
        "memory": {"peak_rss_mb": None},
        "epochs": [],
        "cube": {"spec": scrub(spec["cube"]), "fingerprint": None, "chunk_shape": None},
        "environment": spec["environment"],
    }
    results.validate(result)
    return result


def claim_run_dir(out: Path, run_id: str | None = None) -> Path:
    """Create `out/<run-id>`; creation is atomic, so two suites never share a run dir."""
    run_id = run_id or new_run_id()
    if not run_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise CubebenchError(f"run id {run_id!r}: use letters, digits, '-', '_' and '.'")
    run_dir = Path(out) / run_id
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise CubebenchError(
            f"run {run_id!r} already exists in {out}: pick another --run-id"
        ) from None
    except OSError as error:
        raise CubebenchError(f"cannot create {run_dir}: {error.strerror}") from None
    return run_dir


@contextlib.contextmanager
def hold_run(run_dir: Path):
    """An exclusive lock on a run dir while a suite writes it: a `--resume` of a run that is
    still going is refused. The kernel releases it when the holder dies, SIGKILL included."""
    path = Path(run_dir) / ".lock"
    with contextlib.ExitStack() as held:
        try:
            fd = held.enter_context(file_lock(path, wait=False))
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "?"
            raise CubebenchError(
                f"run {Path(run_dir).name!r} is still running (pid {holder}): "
                "wait for it or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield


# what a resumed run takes from its manifest (the cube's storage options are never stored)
RESUMED_SETTINGS = ("cube", "cases", "device", "epochs", "seed", "threads", "timeout_s")


def resume_settings(out: Path, run_id: str) -> dict[str, Any]:
    """The settings of run `run_id` under `out`, for `run_suite(..., resume=True)`."""
    run_dir = Path(out) / run_id
    path = run_dir / results.RUN_MANIFEST
    if not path.is_file():
        raise CubebenchError(f"no run {run_id!r} to resume in {out} (no {path.name} there)")
    manifest = results.read_json(path)
    missing = [k for k in RESUMED_SETTINGS if k not in manifest]
    if missing:
        raise CubebenchError(f"{path} lacks {', '.join(missing)}: cannot resume it")
    settings = {k: manifest[k] for k in RESUMED_SETTINGS}
    settings["timeout"] = settings.pop("timeout_s")
    settings["nproc"] = manifest.get("nproc", 1)  # runs from before `--nproc` had one rank
    return settings


def finished_cases(run_dir: Path, cases: list[str]) -> dict[str, CaseOutcome]:
    """Cases of `cases` with a result file (written atomically: present means complete)."""
    done = {}
    for name in cases:
        path = Path(run_dir) / f"{name}.json"
        if path.is_file():
            result = results.load_result(path)
            seconds = (result.get("timing") or {}).get("total_s") or 0.0
            done[name] = CaseOutcome(name, result["status"], result["reason"], seconds)
    return done


def _environment_changes(before: dict, after: dict) -> list[str]:
    keys = ("python", "platform", "packages", "cpu", "gpu", "git_sha", "image")
    return [k for k in keys if before.get(k) != after.get(k)]


def run_suite(
    *,
    cube: str,
    cases: list[str],
    available: dict[str, tuple[Path, type[Case]]],
    run_dir: Path,
    device: str = "auto",
    epochs: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    timeout: float = 1800.0,
    nproc: int = 1,
    storage_options: dict | None = None,
    progress: Progress | None = None,
    tracker: SuiteTracker | None = None,
    resume: bool = False,
) -> list[CaseOutcome]:
    """Run `cases` one after another, each in its own worker, into `run_dir` (claimed, or
    with `resume` an earlier run's: only cases without a result file run).

    `nproc` > 1: the cases that declare `distributed` train with torch DDP on that many ranks
    (torchrun), which share the thread budget; the others run as usual.

    Each result is on disk before `tracker` (mlflow) sees it: tracking can fail, results not.
    """
    run_id = run_dir.name
    threads = threads or min(os.cpu_count() or 1, 8)
    environment = results.environment_manifest(threads, seed, worker_env(threads))
    manifest_path = run_dir / results.RUN_MANIFEST
    if resume:
        manifest = results.read_json(manifest_path)
        changed = _environment_changes(results.read_environment(run_dir), environment)
        resumed = {"at": results.now(), "environment_changed": changed}
        manifest["resumed"] = [*manifest.get("resumed", []), resumed]
        manifest.update(status="running", finished_at=None)
    else:
        results.write_json_atomic(run_dir / results.ENVIRONMENT, environment)
        manifest = {
            "run_id": run_id,
            "cube": scrub(cube),
            "cases": cases,
            "device": device,
            "epochs": epochs,
            "seed": seed,
            "threads": threads,
            "nproc": nproc,
            "timeout_s": timeout,
            "started_at": results.now(),
            "finished_at": None,
            "status": "running",
            "outcomes": {},
        }
    results.write_json_atomic(manifest_path, manifest)
    if tracker:
        tracker.suite_started(manifest, environment)
    done = finished_cases(run_dir, cases) if resume else {}
    outcomes = []
    try:
        for name in cases:
            if name in done:
                outcome = done[name]
            else:
                outcome = _run_one(
                    name,
                    available[name],
                    cube,
                    run_dir,
                    manifest,
                    environment,
                    storage_options,
                    progress,
                    tracker,
                )
            outcomes.append(outcome)
            manifest["outcomes"][name] = {"status": outcome.status, "reason": outcome.reason}
            results.write_json_atomic(manifest_path, manifest)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the finished cases stay, `--resume` goes on
        with contextlib.suppress(OSError):
            results.write_json_atomic(manifest_path, {**manifest, "status": "interrupted"})
        raise
    manifest.update(finished_at=results.now(), status="finished")
    results.write_json_atomic(manifest_path, manifest)
    return outcomes


def _run_one(
    name: str,
    found: tuple[Path, type[Case]],
    cube: str,
    run_dir: Path,
    manifest: dict,
    environment: dict,
    storage_options: dict | None,
    progress: Progress | None,
    tracker: SuiteTracker | None,
) -> CaseOutcome:
    path, cls = found
    epochs = manifest["epochs"]
    nproc = manifest.get("nproc", 1) if cls.distributed else 1
    params = {"epochs": epochs} if epochs is not None and "epochs" in cls.parameters else {}
    spec = {
        "run_id": manifest["run_id"],
        "case": name,
        "case_path": str(path.resolve()),
        "library": cls.library,
        "task": cls.task,
        "params": {**cls.parameters, **params},
        "cube": cube,  # the manifest's copy is scrubbed of credentials
        "device": manifest["device"],
        "seed": manifest["seed"],
        "threads": max(1, manifest["threads"] // nproc),  # per rank: they share the budget
        "nproc": nproc,
        "environment": environment,
        "tensorboard_dir": str(run_dir / "tb" / name),
        "result_path": str(run_dir / f"{name}.json"),
    }
    if progress:
        progress(name, {"event": "start"})
    if tracker:
        tracker.case_started(manifest["run_id"], name)
    outcome = run_case(spec, run_dir, manifest["timeout_s"], progress, storage_options)
    if tracker:
        tracker.case_finished(name, Path(spec["result_path"]))
    if progress:
        progress(name, {"event": "end", "status": outcome.status, "reason": outcome.reason})
    return outcome
