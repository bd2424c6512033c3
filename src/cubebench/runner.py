"""The suite runner: discovers the cases, runs each in its own process, never stops early.

Each case runs in `python -m cubebench.worker` with its thread count fixed through the usual
environment variables, under a timeout. A case that raises, hangs past its timeout or dies by a
signal (OOM killer, SIGKILL) becomes a failed result with the reason, and the suite goes on.
"""

from __future__ import annotations

import contextlib
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

from cubebench import interrupts, results
from cubebench.case import Case
from cubebench.errors import CubebenchError
from cubebench.locks import file_lock
from cubebench.processes import RUNNER_PID_ENV, STORAGE_OPTIONS_ENV, exit_reason, worker_env
from cubebench.redact import scrub
from cubebench.task import task_for
from cubebench.tracking import SuiteTracker


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


@dataclass
class CaseOutcome:
    case: str
    status: str
    reason: str | None
    seconds: float
    repeat: int = 0

    @property
    def name(self) -> str:
        """The result's file stem: `case`, or `case@repeat` after the first repeat."""
        return results.result_name(self.case, self.repeat)


Progress = Callable[[str, dict[str, Any]], None]  # (job name, worker event) -> None


def _tail(path: Path, size: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def run_case(
    spec: dict,
    run_dir: Path,
    timeout: float,
    progress: Progress | None = None,
    storage_options: dict | None = None,
) -> CaseOutcome:
    """One repeat of a case in a worker process; returns how it ended (the result file says
    the rest)."""
    case, repeat = spec["case"], int(spec.get("repeat", 0))
    name = results.result_name(case, repeat)
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
            returncode = interrupts.wait(proc, timeout)
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
        return CaseOutcome(case, written["status"], written["reason"], seconds, repeat)
    if timed_out:
        reason = f"timed out after {timeout:g} s"
    else:
        reason = exit_reason(returncode, _tail(log_path))
    results.write_json_atomic(result_path, failed_result(spec, reason, seconds))
    return CaseOutcome(case, "failed", reason, seconds, repeat)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def _read_events(proc: subprocess.Popen, name: str, progress: Progress | None) -> None:
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
                progress(name, event)
            except Exception:  # a display problem must not stop the case
                progress = None


def failed_result(spec: dict, reason: str, seconds: float) -> dict:
    """The result of a case whose worker could not write one (timeout, signal, crash)."""
    result = results.new_result(
        run_id=spec["run_id"],
        case=spec["case"],
        library=spec["library"],
        task=spec["task"],
        params=spec["params"],
        seed=spec["seed"],
        split_seed=spec["split_seed"],
        repeat=spec.get("repeat", 0),
        threads=spec["threads"],
        world_size=spec.get("nproc", 1),
        device=spec["device"] if spec["device"] != "auto" else "cpu",
        cube_spec=scrub(spec["cube"]),
        environment=spec["environment"],
    )
    result["reason"] = reason
    result["timing"]["total_s"] = round(seconds, 3)
    result["finished_at"] = results.now()
    results.validate(result)
    return result


def claim_run_dir(out: Path, run_id: str | None = None) -> Path:
    """Create `out/<run-id>`; creation is atomic, so two suites never share a run dir."""
    run_id = run_id or new_run_id()
    _check_run_id(run_id)
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


def join_run_dir(out: Path, run_id: str) -> Path:
    """`out/<run-id>`, created when missing: several suites (one per image) add their cases
    to one run, one after the other under `hold_run(..., wait=True)`."""
    _check_run_id(run_id)
    run_dir = Path(out) / run_id
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CubebenchError(f"cannot create {run_dir}: {error.strerror}") from None
    return run_dir


def _check_run_id(run_id: str) -> None:
    if not run_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise CubebenchError(f"run id {run_id!r}: use letters, digits, '-', '_' and '.'")


@contextlib.contextmanager
def hold_run(run_dir: Path, wait: bool = False):
    """An exclusive lock on a run dir while a suite writes it: a `--resume` of a run that is
    still going is refused; with `wait` (`--join`) the suite waits for its turn instead. The
    kernel releases it when the holder dies, SIGKILL included."""
    path = Path(run_dir) / ".lock"
    with contextlib.ExitStack() as held:
        try:
            fd = held.enter_context(file_lock(path, wait=wait))
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
    settings["repeat"] = manifest.get("repeat", 1)  # ... and before `--repeat`, one repeat
    settings["vary_split"] = manifest.get("vary_split", False)
    settings["split"] = manifest.get("split")  # ... and before `--split`, the tasks' own
    settings["buffer"] = manifest.get("buffer")
    settings["params"] = manifest.get("params") or []  # ... and before `--param`, none
    settings["task_choice"] = manifest.get("task_choice")
    if manifest.get("variants"):  # `cases` lists the variants: their cases are what runs
        settings["cases"] = list(dict.fromkeys(v[0] for v in manifest["variants"].values()))
    return settings


def jobs(cases: list[str], repeat: int) -> list[tuple[str, int]]:
    """(case, repeat) in the order they run: repeat 0 of every case, then repeat 1, ...: each
    case's repeats are spread over the run, so a slow stretch of a shared machine falls on
    every case alike instead of on one case's repeats."""
    return [(case, r) for r in range(repeat) for case in cases]


def finished_jobs(run_dir: Path, todo: list[tuple[str, int]]) -> dict[str, CaseOutcome]:
    """Jobs of `todo` with a result file (written atomically: present means complete)."""
    done = {}
    for case, repeat in todo:
        name = results.result_name(case, repeat)
        path = Path(run_dir) / f"{name}.json"
        if path.is_file():
            result = results.load_result(path)
            seconds = (result.get("timing") or {}).get("total_s") or 0.0
            done[name] = CaseOutcome(case, result["status"], result["reason"], seconds, repeat)
    return done


def _environment_changes(before: dict, after: dict) -> list[str]:
    keys = ("python", "platform", "packages", "cpu", "gpu", "git_sha", "image")
    return [k for k in keys if before.get(k) != after.get(k)]


def split_seeds(
    cls: type[Case], repeat: int, vary_split: bool, task_choice: dict | None = None
) -> list[int | None]:
    """The split seed of each repeat: the task's own every time (None), or with `vary_split`
    the task's seed + repeat."""
    if not vary_split:
        return [None] * repeat
    from cubebench.task import task_for

    base = task_for(cls.task, task_choice).seed
    return [base + r for r in range(repeat)]


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
    repeat: int = 1,
    vary_split: bool = False,
    split: str | None = None,
    buffer: int | None = None,
    storage_options: dict | None = None,
    progress: Progress | None = None,
    tracker: SuiteTracker | None = None,
    params: list[str] | None = None,
    task_choice: dict | None = None,
    resume: bool = False,
    join: bool = False,
) -> list[CaseOutcome]:
    """Run `cases`, each `repeat` times (seeds seed .. seed + repeat - 1; `vary_split`: the
    task's split seed moves with them; `split`, `buffer`: every task's, see
    `task.with_split`), one worker per repeat, into `run_dir` (claimed, or
    with `resume` an earlier run's: only repeats without a result file run; with `join` the
    run's, when it has a manifest, which must have the same settings: `cases` are added to it
    and those of them with a result are not run again).

    `nproc` > 1: the cases that declare `distributed` train with torch DDP on that many ranks
    (torchrun), which share the thread budget; the others run as usual.

    Each result is on disk before `tracker` (mlflow) sees it: tracking can fail, results not.
    """
    run_id = run_dir.name
    threads = threads or min(os.cpu_count() or 1, 8)
    environment = results.environment_manifest(threads, seed, worker_env(threads))
    manifest_path = run_dir / results.RUN_MANIFEST
    settings = {
        "cube": scrub(cube),
        "device": device,
        "epochs": epochs,
        "seed": seed,
        "threads": threads,
        "nproc": nproc,
        "repeat": repeat,
        "vary_split": vary_split,
        "split": split,
        "buffer": buffer,
        "timeout_s": timeout,
        "params": list(params or []),
        "task_choice": task_choice or None,
    }
    variants = variants_of(cases, available, params)
    names = list(variants)  # the jobs: each variant of each case
    joining = join and manifest_path.is_file()
    if joining:
        manifest = _joined(results.read_json(manifest_path), settings, names)
        changed = _environment_changes(results.read_environment(run_dir), environment)
        joined = {"at": results.now(), "cases": names, "environment_changed": changed}
        manifest["joined"] = [*manifest.get("joined", []), joined]
        manifest.update(status="running", finished_at=None)
    elif resume:
        manifest = results.read_json(manifest_path)
        changed = _environment_changes(results.read_environment(run_dir), environment)
        resumed = {"at": results.now(), "environment_changed": changed}
        manifest["resumed"] = [*manifest.get("resumed", []), resumed]
        manifest.update(status="running", finished_at=None)
    else:
        results.write_json_atomic(run_dir / results.ENVIRONMENT, environment)
        manifest = {
            "run_id": run_id,
            "cases": names,
            **settings,
            "started_at": results.now(),
            "finished_at": None,
            "status": "running",
            "outcomes": {},
        }
    manifest["variants"] = {
        **manifest.get("variants", {}),
        **{n: [case, overrides] for n, (case, overrides) in variants.items()},
    }
    results.write_json_atomic(manifest_path, manifest)
    if tracker:
        tracker.suite_started(manifest, environment)
    todo = jobs(names, repeat)
    done = finished_jobs(run_dir, todo) if resume or joining else {}
    seeds = {
        n: split_seeds(available[c][1], repeat, vary_split, task_choice)
        for n, (c, _) in variants.items()
    }
    outcomes = []
    try:
        for case, r in todo:
            interrupts.check()  # an interrupt swallowed somewhere stops the suite here
            name = results.result_name(case, r)
            if name in done:
                outcome = done[name]
            else:
                base, overrides = variants[case]
                outcome = _run_one(
                    case,
                    r,
                    seeds[case][r],
                    available[base],
                    overrides,
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
            if tracker and r == repeat - 1:
                tracker.case_finished(case, [results.result_name(case, k) for k in range(repeat)])
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the finished cases stay, `--resume` goes on
        with contextlib.suppress(OSError):
            results.write_json_atomic(manifest_path, {**manifest, "status": "interrupted"})
        raise
    manifest.update(finished_at=results.now(), status="finished")
    results.write_json_atomic(manifest_path, manifest)
    return outcomes


def variants_of(
    cases: list[str], available: dict[str, tuple[Path, type[Case]]], params: list[str] | None
) -> dict[str, tuple[str, dict[str, Any]]]:
    """variant name -> (case, parameter overrides) of the selected cases under `--param`
    (`cubebench.grid`); without it each case is its one variant, named as the case."""
    from cubebench.grid import ParamValues, expand

    grid = [ParamValues.parse(text) for text in params or []]
    return expand(cases, {name: cls.parameters for name, (_, cls) in available.items()}, grid)


def _joined(manifest: dict, settings: dict, cases: list[str]) -> dict:
    """The manifest of a run that `cases` join: its settings must be theirs (one run, one set
    of settings, whatever image each case runs in)."""
    recorded = {"params": [], "task_choice": None, **manifest}  # runs from before these
    differ = [k for k, v in settings.items() if recorded.get(k) != v]
    if differ:
        given = ", ".join(f"{k}={settings[k]!r} (run: {recorded.get(k)!r})" for k in differ)
        raise CubebenchError(
            f"run {manifest['run_id']!r} has other settings: {given}; join it with its own"
        )
    return {
        **manifest,
        "cases": [*manifest["cases"], *(c for c in cases if c not in manifest["cases"])],
    }


def _run_one(
    case: str,
    repeat: int,
    split_seed: int | None,
    found: tuple[Path, type[Case]],
    overrides: dict[str, Any],
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
    name = results.result_name(case, repeat)
    spec = {
        "run_id": manifest["run_id"],
        "case": case,
        "repeat": repeat,
        "case_path": str(path.resolve()),
        "library": cls.library,
        "task": task_for(cls.task, manifest.get("task_choice")).name,
        "task_choice": manifest.get("task_choice"),
        "params": {**cls.parameters, **params, **overrides},
        "cube": cube,  # the manifest's copy is scrubbed of credentials
        "device": manifest["device"],
        "seed": manifest["seed"] + repeat,
        "split_seed": split_seed,
        "split": manifest.get("split"),
        "buffer": manifest.get("buffer"),
        "threads": max(1, manifest["threads"] // nproc),  # per rank: they share the budget
        "nproc": nproc,
        "environment": environment,
        "tensorboard_dir": str(run_dir / "tb" / name),
        "result_path": str(run_dir / f"{name}.json"),
    }
    if spec["split_seed"] is None:  # the result records the seed of the split it was scored on
        spec["split_seed"] = task_for(cls.task, manifest.get("task_choice")).seed
    if progress:
        progress(name, {"event": "start"})
    if tracker:
        tracker.job_started(case, repeat)
    outcome = run_case(spec, run_dir, manifest["timeout_s"], progress, storage_options)
    if tracker:
        tracker.job_finished(case, repeat, Path(spec["result_path"]))
    if progress:
        progress(name, {"event": "end", "status": outcome.status, "reason": outcome.reason})
    return outcome
