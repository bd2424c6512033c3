"""Results to mlflow: one parent run per suite, one nested run per case. The run dir is the spool.

Every result is on disk before anything goes to mlflow, so a tracking server that is down at
the start or dies mid-suite costs nothing: the suite goes on offline, says so, and
`cubebench sync RUN_DIR` pushes the missing runs later. Runs are found again by their tags
(`cubebench.run_id`, `cubebench.case`), and a run is marked complete only after everything is
logged, so sync is idempotent: a complete run is skipped, a half-logged one is replaced.

Where: `MLFLOW_TRACKING_URI` when set; otherwise a sqlite store in the results directory
(`mlflow.db`, artifacts in `mlartifacts/`), never the deprecated plain-folder store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cubebench import results
from cubebench.errors import CubebenchError
from cubebench.locks import file_lock
from cubebench.redact import scrub, scrub_tree

EXPERIMENT = "cubebench"
STORE_DB = "mlflow.db"
STORE_ARTIFACTS = "mlartifacts"
TAG_RUN_ID = "cubebench.run_id"
TAG_CASE = "cubebench.case"
TAG_ROLE = "cubebench.role"  # suite | case | repeat
TAG_REPEAT = "cubebench.repeat"  # the repeat index of a `repeat` run
TAG_COMPLETE = "cubebench.complete"  # "true" once everything of the run is logged
TAG_CASES = "cubebench.cases"  # a suite's cases, comma-separated (joined suites add theirs)
# A dead server must cost seconds, not mlflow's default of 7 retries with backoff (minutes);
# and mlflow 3 sends usage telemetry to the internet: results go to the tracking URI only
ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
# mlflow's UI opens an experiment of this kind on its runs (not on the GenAI overview)
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
SYSTEM_METRICS_INTERVAL_S = 2.0
_BATCH = 500  # below mlflow's log_batch limits (1000 metrics, 100 params)

Warn = Callable[[str], None]


def store_uri(results_root: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else the sqlite store of this results directory."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    return f"sqlite:///{Path(results_root).resolve() / STORE_DB}"


def _artifact_root(uri: str, results_root: Path) -> str | None:
    """Artifacts beside a local sqlite store; a server decides for itself (None)."""
    if uri.startswith("sqlite:"):
        return (Path(results_root).resolve() / STORE_ARTIFACTS).as_uri()
    return None


def _client(uri: str):
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise CubebenchError("mlflow is not installed: pip install 'cubebench[track]'") from None
    for noisy in ("mlflow", "urllib3", "alembic"):  # retries and monitors warn per attempt
        logging.getLogger(noisy).setLevel(logging.ERROR)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, artifact_root: str | None) -> str:
    """The experiment's id, created (as model development, see EXPERIMENT_TAGS) if new."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_root, tags=EXPERIMENT_TAGS
            )
        except Exception:  # another suite created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    for key, value in EXPERIMENT_TAGS.items():  # experiments made before the tag was set
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _find_runs(client, experiment_id: str, run_id: str, role: str, case: str | None = None):
    query = f"tags.`{TAG_RUN_ID}` = '{run_id}' and tags.`{TAG_ROLE}` = '{role}'"
    if case is not None:
        query += f" and tags.`{TAG_CASE}` = '{case}'"
    return client.search_runs([experiment_id], filter_string=query, max_results=1000)


def aggregate_metrics(case_results: list[dict]) -> dict[str, float]:
    """The case's figures over its repeats, as the report aggregates them
    (`cubebench.report.tables.aggregate_table`): `<figure>.mean|sd|ci95_low|ci95_high|n`, plus
    `repeats.ok` and `repeats.failed`."""
    from cubebench.report.tables import AGGREGATED, aggregate_table

    (row,) = aggregate_table(case_results, repeats=len(case_results))
    out = {"repeats.ok": float(row["n_ok"]), "repeats.failed": float(row["n_failed"])}
    for key in AGGREGATED:
        stats = {"mean": row[key]} | {
            s: row[f"{key}_{s}"] for s in ("sd", "ci95_low", "ci95_high", "n")
        }
        out.update({f"{key}.{s}": float(v) for s, v in stats.items() if _is_number(v)})
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- what a run holds -------------------------------------------------------------------------


def _numbers(tree: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every number in a JSON tree (booleans are not numbers)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{prefix}{key}.")
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield prefix.rstrip("."), float(tree)


def case_params(result: dict) -> dict[str, str]:
    """The case's hyperparameters and what it ran on, as mlflow params."""
    cube = result["cube"]
    params: dict[str, Any] = {
        **result["params"],
        "case": result["case"],
        "library": result["library"],
        "library_version": result["library_version"],
        "device": result["device"],
        "task": result["task"],
        "cube": cube["spec"],
        "cube_fingerprint": cube["fingerprint"],
        "chunk_shape": cube["chunk_shape"],
        "threads": result["threads"],
        "world_size": result.get("world_size", 1),
        "seed": result["seed"],
        "split_seed": result.get("split_seed"),
        "split": result.get("split"),
        "repeat": result.get("repeat"),
    }
    return {k: str(v) for k, v in scrub_tree(params).items() if v is not None}


def case_metrics(result: dict) -> dict[str, float]:
    """Every number of the result (except its identity and inputs), keyed by its path; the
    accuracy metrics keep their bare names (`rmse`, `by_predictor.scratch.rmse`)."""
    out = dict(_numbers(result.get("metrics") or {}))
    for section in ("timing", "throughput", "loading", "memory", "time_to_quality", "gpu"):
        out.update(_numbers(result.get(section) or {}, f"{section}."))
    return out


def epoch_metrics(result: dict) -> list[tuple[str, float, int]]:
    """(key, value, step) of every number of every epoch record, step = epoch."""
    rows = []
    for record in result.get("epochs", []):
        for key, value in _numbers({k: v for k, v in record.items() if k != "epoch"}):
            rows.append((f"epoch.{key}", value, int(record["epoch"])))
    return rows


def _log(client, run_id: str, params=None, metrics=None, steps=None, tags=None) -> None:
    """Params, metrics (step 0), per-step metrics and tags in a few `log_batch` calls."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()
    entities: list = [Param(k, v) for k, v in (params or {}).items()]
    entities += [Metric(k, v, now, 0) for k, v in (metrics or {}).items()]
    entities += [Metric(k, v, now, step) for k, v, step in steps or []]
    entities += [RunTag(k, v) for k, v in (tags or {}).items()]
    for start in range(0, len(entities), _BATCH):
        chunk = entities[start : start + _BATCH]
        client.log_batch(
            run_id,
            metrics=[e for e in chunk if isinstance(e, Metric)],
            params=[e for e in chunk if isinstance(e, Param)],
            tags=[e for e in chunk if isinstance(e, RunTag)],
        )


def _log_artifact_text(client, run_id: str, path: Path, artifact_path: str | None = None):
    """Upload a text file with every secret masked (a copy; the file on disk is untouched)."""
    text = scrub(path.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(text, encoding="utf-8")
        client.log_artifact(run_id, str(copy), artifact_path)


def suite_tags(manifest: dict, environment: dict) -> dict[str, str]:
    image = environment.get("image") or {}
    tags = {
        TAG_RUN_ID: manifest["run_id"],
        TAG_ROLE: "suite",
        TAG_CASES: ",".join(manifest.get("cases", [])),
        "mlflow.runName": manifest["run_id"],
        "git_sha": environment.get("git_sha"),
        "mlflow.source.git.commit": environment.get("git_sha"),
        "host": socket.gethostname(),
        "image_digest": image.get("digest"),
        "lock_hash": image.get("lock_hash"),
    }
    return {k: scrub(str(v)) for k, v in tags.items() if v is not None}


def suite_params(manifest: dict) -> dict[str, str]:
    keys = ("cube", "device", "epochs", "seed", "threads", "nproc", "timeout_s")
    keys += ("repeat", "vary_split")
    values = scrub_tree({k: manifest.get(k) for k in keys})
    values["task"] = (manifest.get("task_choice") or {}).get("task") or "each case's own"
    return {k: ",".join(v) if isinstance(v, list) else str(v) for k, v in values.items()}


# --- pushing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _store_lock(uri: str, results_root: Path) -> Iterator[None]:
    """Two suites starting at once on a new sqlite store would both run mlflow's schema
    migrations ("duplicate column name: step"): the first to hold this lock runs them."""
    if not uri.startswith("sqlite:"):  # a server serialises for itself
        yield
        return
    with file_lock(Path(results_root) / f".{STORE_DB}.lock"):
        yield


@dataclass
class Store:
    """An mlflow store and the experiment a results directory goes to."""

    uri: str
    experiment_id: str
    client: Any

    @classmethod
    def open(cls, results_root: Path, experiment: str = EXPERIMENT) -> Store:
        uri = store_uri(results_root)
        artifacts = _artifact_root(uri, results_root)
        with _store_lock(uri, results_root):  # the client creates (migrates) the store
            client = _client(uri)
            return cls(uri, _experiment_id(client, experiment, artifacts), client)

    def parent(self, run_dir: Path, manifest: dict, environment: dict) -> str:
        """The suite's parent run: found by its tags, else created."""
        found = _find_runs(self.client, self.experiment_id, manifest["run_id"], "suite")
        if found:
            return found[0].info.run_id
        run = self.client.create_run(self.experiment_id, tags=suite_tags(manifest, environment))
        _log(self.client, run.info.run_id, params=suite_params(manifest))
        return run.info.run_id

    def start_case(self, parent: str, run_id: str, case: str) -> str:
        """A fresh nested run for a case, replacing a half-logged one (and its repeats)."""
        for role in ("case", "repeat"):
            for stale in _find_runs(self.client, self.experiment_id, run_id, role, case):
                self.client.delete_run(stale.info.run_id)
        tags = {
            "mlflow.parentRunId": parent,
            "mlflow.runName": case,
            TAG_RUN_ID: run_id,
            TAG_CASE: case,
            TAG_ROLE: "case",
            TAG_COMPLETE: "false",
        }
        return self.client.create_run(self.experiment_id, tags=tags).info.run_id

    def start_repeat(self, case_run: str, run_id: str, case: str, repeat: int) -> str:
        """A fresh run for one repeat of a case, nested under the case's run."""
        tags = {
            "mlflow.parentRunId": case_run,
            "mlflow.runName": f"{case} #{repeat}",
            TAG_RUN_ID: run_id,
            TAG_CASE: case,
            TAG_ROLE: "repeat",
            TAG_REPEAT: str(repeat),
            TAG_COMPLETE: "false",
        }
        return self.client.create_run(self.experiment_id, tags=tags).info.run_id

    def finish_aggregate(self, case_run: str, case_results: list[dict]) -> None:
        """The case's run over its repeats: parameters, the aggregate figures, complete."""
        ok = [r for r in case_results if r["status"] == "ok"]
        _log(
            self.client,
            case_run,
            params=case_params(case_results[0]) | {"repeats": str(len(case_results))},
            metrics=aggregate_metrics(case_results),
            tags={"status": "ok" if ok else "failed"},
        )
        self.client.set_tag(case_run, TAG_COMPLETE, "true")
        self.client.set_terminated(case_run, "FINISHED" if ok else "FAILED")

    def finish_case(self, mlflow_run: str, run_dir: Path, result: dict) -> None:
        """Log a result (a case's, or one repeat's) into its run, then mark it complete."""
        client = self.client
        tags = {"status": result["status"]}
        if result.get("reason"):
            tags["reason"] = scrub(result["reason"])
        _log(
            client,
            mlflow_run,
            params=case_params(result),
            metrics=case_metrics(result),
            steps=epoch_metrics(result),
            tags=tags,
        )
        name = results.result_name(result["case"], result.get("repeat", 0))
        for path in (run_dir / f"{name}.json", run_dir / results.ENVIRONMENT):
            if path.exists():
                _log_artifact_text(client, mlflow_run, path)
        tensorboard = run_dir / "tb" / name
        if tensorboard.is_dir() and any(tensorboard.iterdir()):
            client.log_artifacts(mlflow_run, str(tensorboard), "tensorboard")
        client.set_tag(mlflow_run, TAG_COMPLETE, "true")
        client.set_terminated(mlflow_run, "FINISHED" if result["status"] == "ok" else "FAILED")

    def finish_suite(self, parent: str, run_dir: Path, manifest: dict) -> None:
        """The run manifest and the report into the parent run; mark it complete."""
        for name in (results.RUN_MANIFEST, results.ENVIRONMENT, "report.md", "report.html"):
            if (run_dir / name).exists():
                _log_artifact_text(self.client, parent, run_dir / name, "report")
        for png in sorted(run_dir.glob("*.png")):
            self.client.log_artifact(parent, str(png), "report")
        failed = [c for c, o in manifest.get("outcomes", {}).items() if o.get("status") != "ok"]
        # a tag, not a param: suites that `--join` the run add cases to it
        self.client.set_tag(parent, TAG_CASES, scrub(",".join(manifest.get("cases", []))))
        self.client.set_tag(parent, TAG_COMPLETE, "true")
        self.client.set_terminated(parent, "FAILED" if failed else "FINISHED")

    def complete_cases(self, run_id: str) -> set[str]:
        runs = _find_runs(self.client, self.experiment_id, run_id, "case")
        return {r.data.tags[TAG_CASE] for r in runs if r.data.tags.get(TAG_COMPLETE) == "true"}

    def suite_complete(self, run_id: str) -> bool:
        runs = _find_runs(self.client, self.experiment_id, run_id, "suite")
        return any(r.data.tags.get(TAG_COMPLETE) == "true" for r in runs)


@dataclass
class SyncSummary:
    uri: str
    pushed: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    suite_pushed: bool = False


def sync(run_dir: Path, experiment: str = EXPERIMENT) -> SyncSummary:
    """Push every case of a run dir that the store does not hold complete; idempotent. A case
    with repeats goes as its run (the aggregate) with one nested run per repeat."""
    run_dir = Path(run_dir)
    manifest, case_results = results.load_run(run_dir)
    environment = results.read_environment(run_dir)
    by_case: dict[str, list[dict]] = {}
    for result in case_results:
        by_case.setdefault(result["case"], []).append(result)
    try:
        store = Store.open(run_dir.parent, experiment)
        parent = store.parent(run_dir, manifest, environment)
        summary = SyncSummary(store.uri)
        done = store.complete_cases(manifest["run_id"])
        repeated = int(manifest.get("repeat", 1)) > 1
        for name, found in by_case.items():
            if name in done:
                summary.already.append(name)
                continue
            case_run = store.start_case(parent, manifest["run_id"], name)
            if not repeated:
                store.finish_case(case_run, run_dir, found[0])
            else:
                for result in found:
                    repeat_run = store.start_repeat(
                        case_run, manifest["run_id"], name, result["repeat"]
                    )
                    store.finish_case(repeat_run, run_dir, result)
                store.finish_aggregate(case_run, found)
            summary.pushed.append(name)
        if not store.suite_complete(manifest["run_id"]) and manifest.get("status") == "finished":
            store.finish_suite(parent, run_dir, manifest)
            summary.suite_pushed = True
    except CubebenchError:
        raise
    except Exception as error:
        where = scrub(store_uri(run_dir.parent))
        raise CubebenchError(f"mlflow at {where}: {_one_line(error)}") from None
    return summary


def _one_line(error: BaseException) -> str:
    text = scrub(str(error)).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


# --- during a suite ---------------------------------------------------------------------------


class SuiteTracker:
    """Tracks a suite while it runs; on the first mlflow failure it goes offline for the rest
    of the suite (one warning), and the run dir keeps everything for `cubebench sync`."""

    def __init__(self, run_dir: Path, experiment: str = EXPERIMENT, warn: Warn | None = None):
        self.run_dir = Path(run_dir)
        self.experiment = experiment
        self.warn = warn or (lambda message: None)
        self.store: Store | None = None
        self.parent: str | None = None
        self.case_runs: dict[str, str] = {}
        self.job_runs: dict[tuple[str, int], str] = {}
        self.run_id = self.run_dir.name
        self.repeats = 1
        self.synced: list[str] = []
        self._monitor = None
        self.offline_reason: str | None = None

    @property
    def online(self) -> bool:
        return self.offline_reason is None

    def warn_with(self, warn: Warn) -> None:
        """Say future warnings through `warn` (the progress display's line)."""
        self.warn = warn

    def finish(self, resumed: bool = False) -> None:
        """After the report: the suite's parent run gets the manifest and the report. A
        resumed suite first pushes whatever an earlier, interrupted attempt could not
        (`sync`: only what the store lacks)."""
        if not self.online:
            return
        if not resumed:
            self.suite_finished()
            return
        try:
            sync(self.run_dir, self.experiment)
            manifest = results.read_json(self.run_dir / results.RUN_MANIFEST)
            self.synced = list(manifest.get("cases", []))
        except CubebenchError as error:
            self.offline_reason = str(error)

    def summary(self, cases: list[str]) -> tuple[str, bool]:
        """The line `cubebench run` ends with about mlflow, and whether it is a warning."""
        if self.online and self.store is not None:
            return f"mlflow:  {scrub(self.store.uri)} (run {self.parent})", False
        pending = len(cases) - len(set(self.synced))
        return (
            f"warning: mlflow is offline ({self.offline_reason}); {pending} of {len(cases)} "
            f"cases are only on disk: push them with `cubebench sync {self.run_dir}`",
            True,
        )

    def _fail(self, error: BaseException) -> None:
        self._stop_monitor()
        if self.online:
            self.offline_reason = _one_line(error)
            where = scrub(store_uri(self.run_dir.parent))
            self.warn(
                f"mlflow at {where} failed ({self.offline_reason}); the suite goes on and its "
                f"results stay in {self.run_dir}: push them later with "
                f"`cubebench sync {self.run_dir}`"
            )

    def suite_started(self, manifest: dict, environment: dict) -> None:
        self.repeats = int(manifest.get("repeat", 1))
        try:
            self.store = Store.open(self.run_dir.parent, self.experiment)
            self.parent = self.store.parent(self.run_dir, manifest, environment)
        except Exception as error:
            self._fail(error)

    def job_started(self, case: str, repeat: int = 0) -> None:
        """A repeat of a case starts: its run (nested under the case's run when the suite has
        repeats), with this machine's system metrics sampled while it runs."""
        if not self.online or self.store is None or self.parent is None:
            return
        try:
            if repeat == 0 or case not in self.case_runs:
                self.case_runs[case] = self.store.start_case(self.parent, self.run_id, case)
            mlflow_run = self.case_runs[case]
            if self.repeats > 1:
                mlflow_run = self.store.start_repeat(mlflow_run, self.run_id, case, repeat)
            self.job_runs[(case, repeat)] = mlflow_run
            self._start_monitor(mlflow_run)
        except Exception as error:
            self._fail(error)

    def job_finished(self, case: str, repeat: int, result_path: Path) -> None:
        self._stop_monitor()
        mlflow_run = self.job_runs.get((case, repeat))
        if not self.online or self.store is None or mlflow_run is None:
            return
        try:
            result = results.load_result(result_path)
            self.store.finish_case(mlflow_run, self.run_dir, result)
            if self.repeats == 1:
                self.synced.append(case)
        except Exception as error:
            self._fail(error)

    def case_finished(self, case: str, names: list[str]) -> None:
        """Every repeat of `case` has a result: with repeats, its run gets their aggregate."""
        case_run = self.case_runs.get(case)
        if self.repeats == 1 or not self.online or self.store is None or case_run is None:
            return
        if len([k for k in self.job_runs if k[0] == case]) < len(names):
            return  # some repeats ran in an earlier attempt: `sync` pushes the whole case
        try:
            found = [results.load_result(self.run_dir / f"{n}.json") for n in names]
            self.store.finish_aggregate(case_run, found)
            self.synced.append(case)
        except Exception as error:
            self._fail(error)

    def suite_finished(self) -> None:
        """After the report: the manifest and the report go into the parent run."""
        if not self.online or self.store is None or self.parent is None:
            return
        try:
            manifest = results.read_json(self.run_dir / results.RUN_MANIFEST)
            self.store.finish_suite(self.parent, self.run_dir, manifest)
        except Exception as error:
            self._fail(error)

    def _start_monitor(self, mlflow_run: str) -> None:
        """mlflow's system metrics (CPU, memory, disk, network; GPU with pynvml) of this
        machine while the case's worker runs, sampled from this process."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                mlflow_run,
                sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                tracking_uri=self.store.uri if self.store else None,
            )
            monitor.start()
            self._monitor = monitor
        except Exception as error:  # psutil missing or similar: no system metrics, no failure
            self.warn(f"no system metrics: {_one_line(error)}")

    def _stop_monitor(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            with contextlib.suppress(Exception):  # the server died: its metrics go with it
                monitor.finish()
