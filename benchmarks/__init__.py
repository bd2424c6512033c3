"""asv benchmarks of cubebench, one module per area (xarray's `asv_bench/` is the model).

- `loading`: the chunk stream and its torch / tf adapters against raw decode, per layout.
- `cases`: every case of `cases/` end to end, on the `tiny` and `small` synthetic cubes.

Run them with `nox -s asv` (HEAD, then the HTML), compare two commits with
`nox -s asv-compare -- BASE HEAD`; CI gates on `benchmarks/scripts/gate.py`.

Cubes are written once per asv run into the `setup_cache` directory that every class shares,
never taken from the user's cube cache: a commit that changes the generator is measured on
its own cubes. Numbers a benchmark needs from one expensive run (a whole case, a
`bench-loader` row) are computed by the first benchmark that asks and kept next to the cubes
as JSON, so the `track_*` benchmarks of one parameter set share one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# The gate runs HEAD's benchmarks against BASE's `src/` too: import what moved from where it was
try:
    from cubebench.discovery import default_cases_dir, discover
    from cubebench.processes import worker_env
except ImportError:  # before the runner and the worker stopped importing each other
    from cubebench.runner import default_cases_dir, discover, worker_env  # noqa: F401

THREADS = 2  # what a CI runner or a laptop core pair gives; every number uses the same
SEED = 0
LOADER_PRESET = "small"  # tiny is one chunk per variable in the balanced layout
LOADER_LAYOUTS = ("map", "ts", "balanced")
CASE_PRESETS = ("tiny", "small")
CUBES = [(LOADER_PRESET, layout) for layout in LOADER_LAYOUTS] + [("tiny", "balanced")]

# thread pools sized before any framework loads, exactly as the runner sizes its workers'
os.environ.update({k: v for k, v in worker_env(THREADS).items() if k not in os.environ})


def _cases_dir() -> Path:
    """The benchmarked commit's `cases/`: beside its `src/` where cubebench runs from a
    checkout (`--python=same`, the gate's worktrees), in asv's build checkout where an
    asv-managed environment installed the wheel, else this checkout's."""
    in_tree = default_cases_dir()
    if in_tree.is_absolute() and in_tree.is_dir():
        return in_tree
    build = Path(os.environ.get("ASV_BUILD_DIR", "/nonexistent")) / "cases"
    return build if build.is_dir() else Path(__file__).resolve().parents[1] / "cases"


# read by `discover()` here and by the `cubebench run` processes the benchmarks start
os.environ.setdefault("CUBEBENCH_CASES_DIR", str(_cases_dir()))


def cube_path(cubes: str, preset: str, layout: str = "balanced") -> str:
    return str(Path(cubes) / f"{preset}-{layout}.zarr")


def memo(cubes: str, name: str, compute: Callable[[], dict]) -> dict:
    """`compute()` once per asv run, its JSON kept in the shared cache directory."""
    path = Path(cubes) / "memo" / f"{name}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        row = compute()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row))
        tmp.replace(path)
    return json.loads(path.read_text())


def run_case(cubes: str, case: str, preset: str) -> dict:
    """One case through the real CLI and runner (its own worker process): the result file."""
    out = Path(cubes) / "runs"
    run_id = f"{preset}-{case}"
    cmd = [sys.executable, "-m", "cubebench", "run", "--cube", cube_path(cubes, preset)]
    cmd += ["--cases", case, "--threads", str(THREADS), "--seed", str(SEED), "--no-tracking"]
    cmd += ["--out", str(out), "--run-id", run_id]
    run = subprocess.run(cmd, capture_output=True, text=True)  # progress bars on stderr
    if run.returncode and not (out / run_id / f"{case}.json").exists():
        raise RuntimeError(f"cubebench run failed: {run.stderr.strip()[-2000:]}")
    result = json.loads((out / run_id / f"{case}.json").read_text())
    if result["status"] != "ok":
        raise RuntimeError(f"{case} on {preset} failed: {result['reason']}")
    return result


class CubeBenchmark:
    """Base of every benchmark class: the one `setup_cache` they share (asv keys it by the
    function's module and line, so it runs once per asv run for all of them)."""

    timeout = 900

    def setup_cache(self) -> str:
        from cubebench.cube import make_cube

        root = Path.cwd().resolve()
        for preset, layout in CUBES:
            make_cube(preset, SEED, layout, output=Path(cube_path(str(root), preset, layout)))
        return str(root)
