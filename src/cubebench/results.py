"""Result files: one JSON per case, written atomically, validated against a versioned schema.

Layout of a run: `RESULTS/<run-id>/run.json` (the run manifest), `<case>.json` per case
(repeat 0) and `<case>@<i>.json` per further repeat, `environment.json`, and the report's
`summary.json`. Results are written as `cubebench/schemas/result-v2.schema.json`; version 1
results (runs of earlier versions) still validate against result-v1, so old runs keep
rendering. Documented in docs/results.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from cubebench.errors import CubebenchError

SCHEMA_VERSION = 2
# every version this cubebench reads, with its schema file (the written one is SCHEMA_VERSION)
SCHEMAS = {1: "result-v1.schema.json", 2: "result-v2.schema.json"}
RUN_MANIFEST = "run.json"
ENVIRONMENT = "environment.json"
SUMMARY = "summary.json"  # written by the report: aggregates over repeats, comparisons
NOT_RESULTS = {RUN_MANIFEST, ENVIRONMENT, SUMMARY}

# what the environment manifest reports versions of, when installed
PACKAGES = (
    "cubebench",
    "numpy",
    "xarray",
    "zarr",
    "dask",
    "tensorstore",
    "numba",
    "scikit-learn",
    "torch",
    "tensorflow",
    "tensorflow-cpu",
    "keras",
    "mlflow",
)
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write-then-rename in the same directory: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=_jsonable)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    """numpy scalars and paths in results become plain JSON values."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@cache
def schema(version: int = SCHEMA_VERSION) -> dict:
    """The JSON Schema of result files of `version` (one of SCHEMAS)."""
    text = resources.files("cubebench").joinpath(f"schemas/{SCHEMAS[version]}").read_text()
    return json.loads(text)


def validate(result: dict, source: Path | str | None = None) -> None:
    """Raise CubebenchError naming the file (or case) and the first schema violation.

    Each result is checked against the schema of its own `schema_version` (any of SCHEMAS):
    a run written by an earlier cubebench stays readable."""
    import jsonschema

    if not isinstance(result, dict):
        raise CubebenchError(f"{source or 'result'} is not a JSON object")
    version = result.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in SCHEMAS:
        readable = ", ".join(str(v) for v in SCHEMAS)
        raise CubebenchError(
            f"{source or 'result'}: unknown schema_version {version!r} "
            f"(this cubebench reads {readable})"
        )
    try:
        jsonschema.validate(result, schema(version))
    except jsonschema.ValidationError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        what = source or f"result {result.get('case', '?')!r}"
        raise CubebenchError(f"{what} breaks the schema at {where}: {error.message}") from None


def new_result(
    *,
    run_id: str,
    case: str,
    library: str,
    task: str,
    params: dict,
    seed: int,
    split_seed: int,
    repeat: int,
    threads: int,
    world_size: int,
    device: str,
    cube_spec: str,
    environment: dict,
    library_version: str | None = None,
    started_at: str | None = None,
) -> dict:
    """A case's result with every key the schema knows, each measured value null: the one
    builder of result records (the worker fills it in; the runner writes it, failed, for a
    worker that could not; an inline run fills it as the worker does)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "case": case,
        "library": library,
        "library_version": library_version,
        "task": task,
        "status": "failed",
        "reason": None,
        "device": device,
        "params": params,
        "seed": seed,
        "split_seed": split_seed,
        "split": None,
        "repeat": repeat,
        "threads": threads,
        "world_size": world_size,
        "started_at": started_at,
        "finished_at": None,
        "metrics": None,
        "timing": dict.fromkeys(
            ("prepare_s", "warmup_s", "fit_s", "probe_s", "predict_s", "total_s")
        ),
        "throughput": dict.fromkeys(
            ("train_samples", "train_samples_per_s", "predict_samples_per_s")
        ),
        "loading": dict.fromkeys(
            ("stall_fraction", "stall_ci95", "stall_method", "wait_fraction", "read_amplification")
        ),
        "time_to_quality": None,
        "memory": {"peak_rss_mb": None, "gpu_peak_mb": None},
        "gpu": None,  # CUDA results: `cubebench.measure.gpu_record`
        "epochs": [],
        "cube": {"spec": cube_spec, "fingerprint": None, "chunk_shape": None},
        "environment": environment,
    }


def result_name(case: str, repeat: int = 0) -> str:
    """The file stem of a case's result: `case` for repeat 0, `case@i` after."""
    return case if repeat == 0 else f"{case}@{repeat}"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_sha() -> str | None:
    if sha := os.environ.get("CUBEBENCH_GIT_SHA"):  # set in images, which carry no .git
        return sha
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# nvidia-smi's fields of each GPU, with their keys in `environment.json` (`compute_cap`:
# drivers from 510 on; older ones are asked without it)
GPU_FIELDS = {
    "name": "name",
    "driver_version": "driver",
    "memory.total": "memory",
    "uuid": "uuid",
    "compute_cap": "compute_capability",
}


def _nvidia_smi(fields: list[str]) -> list[list[str]] | None:
    """One row of `fields` per GPU, or None where nvidia-smi is missing or refuses them."""
    query = f"--query-gpu={','.join(fields)}"
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[v.strip() for v in r.split(", ")] for r in out.stdout.strip().splitlines()]
    rows = [r for r in rows if len(r) == len(fields)]
    return None if out.returncode or not rows else rows


def _gpu() -> dict | None:
    """The GPUs (`nvidia-smi`): the first one's name, driver and memory as before, and every
    GPU under `devices`; the CUDA each installed framework was built for (`cuda_builds`)."""
    fields = list(GPU_FIELDS)
    rows = _nvidia_smi(fields)
    if rows is None:  # a driver before 510 (no compute_cap), or no GPU at all
        fields = fields[:-1]
        rows = _nvidia_smi(fields)
    if rows is None:
        return None
    devices = [
        {GPU_FIELDS[f]: None if v in ("", "[N/A]", "N/A") else v for f, v in zip(fields, row)}
        for row in rows
    ]
    first = devices[0]
    return {
        "count": len(rows),
        "name": first["name"],
        "driver": first["driver"],
        "memory": first["memory"],
        "devices": devices,
        "cuda_builds": _cuda_builds(),
    }


# where each framework writes the CUDA version it was built for, without importing it
_CUDA_BUILD_FILES = {
    "torch": ("version.py", r"^cuda\b[^=\n]*=\s*['\"]([^'\"]+)['\"]"),
    "tensorflow": (
        "python/platform/build_info.py",
        r"['\"]cuda_version['\"]\s*[,:]\s*['\"]([^'\"]+)['\"]",
    ),
}


def _cuda_builds() -> dict[str, str | None]:
    """{framework: CUDA version it was built for, None for a CPU build} of the installed
    frameworks, read from their own files (importing torch or TensorFlow costs seconds)."""
    builds: dict[str, str | None] = {}
    for name, (file, pattern) in _CUDA_BUILD_FILES.items():
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        try:
            text = (Path(next(iter(spec.submodule_search_locations))) / file).read_text()
        except OSError:
            continue
        found = re.search(pattern, text, re.MULTILINE)
        builds[name] = found.group(1) if found else None
    return builds


def environment_manifest(threads: int, seed: int, env: dict[str, str] | None = None) -> dict:
    """Everything that can change the numbers, recorded once per run (`env`: the workers')."""
    env = os.environ if env is None else env
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": {name: v for name in PACKAGES if (v := _version(name))},
        "cpu": {"model": _cpu_model(), "count": os.cpu_count()},
        "gpu": _gpu(),
        "threads": {"per_case": threads, **{v: env.get(v) for v in THREAD_VARIABLES}},
        "seed": seed,
        "git_sha": _git_sha(),
        "image": {
            "digest": os.environ.get("CUBEBENCH_IMAGE_DIGEST"),
            "lock_hash": os.environ.get("CUBEBENCH_LOCK_HASH"),
        },
    }


def load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """(run manifest, results) of a results directory: every result file (`<case>.json`,
    `<case>@<i>.json`; not the manifest, environment or summary), validated, in the manifest's
    case order (cases it does not list after, by name), each case's repeats in order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CubebenchError(f"no results directory at {run_dir}")
    manifest_path = run_dir / RUN_MANIFEST
    if not manifest_path.exists():
        raise CubebenchError(f"{run_dir} is not a cubebench run: no {RUN_MANIFEST}")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise CubebenchError(f"{manifest_path} is not a JSON object")
    results = []
    for path in sorted(run_dir.glob("*.json")):
        if path.name in NOT_RESULTS:
            continue
        results.append(load_result(path))
    order = {name: i for i, name in enumerate(manifest.get("cases", []))}
    results.sort(key=lambda r: (order.get(r["case"], len(order)), r["case"], _repeat_of(r)))
    return manifest, results


def _repeat_of(result: dict) -> int:
    """The result's repeat index; 0 for version 1 results, which had none."""
    repeat = result.get("repeat", 0)
    return repeat if isinstance(repeat, int) and not isinstance(repeat, bool) else 0


def read_environment(run_dir: Path) -> dict:
    """The run's environment manifest; {} where it is missing or unreadable."""
    try:
        return read_json(Path(run_dir) / ENVIRONMENT)
    except CubebenchError:
        return {}


def load_result(path: Path) -> dict:
    """One case's result file, validated."""
    result = read_json(Path(path))
    validate(result, path)
    return result


def read_json(path: Path) -> dict:
    """A JSON file of a run, or a one-line CubebenchError."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CubebenchError(f"{path} is not valid JSON: {error}") from None
    except OSError as error:
        raise CubebenchError(f"cannot read {path}: {error.strerror}") from None
