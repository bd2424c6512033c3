"""The Python half of `benchmarks/gpu_check.sh`: what the interpreter sees, and the one summary.

    python benchmarks/scripts/gpu_summary.py probe OUT_DIR
    python benchmarks/scripts/gpu_summary.py summary OUT_DIR --cube SPEC --epochs N ...

`probe` imports cubebench's dependencies and torch, and writes `OUT_DIR/torch_env.json` (torch
and its CUDA build, whether a GPU is seen, its name); a missing package fails it with one line.

`summary` writes `OUT_DIR/gpu_check.json` from what the check left in OUT_DIR: the two passes'
run directories `runs/cuda` and `runs/cpu` (read with `cubebench.results.load_run`, so every
result is validated against its schema), `runs/cuda/environment.json`, the loader's JSON lines
`loader.jsonl`, the steps' exit statuses and times `steps.tsv` (name, exit status, start,
end, limit; tab-separated) and `torch_env.json`. It exits 1 when a step or a case failed or a
loader row is missing (the summary is written all the same), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

FORMAT = "cubebench-gpu-check/1"
CASES = ("torch-mlp", "torch-transfer", "torch-cnn")
PASSES = ("cuda", "cpu")  # run ids under OUT_DIR/runs; "cuda" ran with --device cpu in CPU_ONLY
SUMMARY = "gpu_check.json"
STEPS = "steps.tsv"
TORCH_ENV = "torch_env.json"
LOADER = "loader.jsonl"
GPU_KEYS = (  # result["gpu"] of a cuda result (cubebench.gpu); null before it exists
    "name",
    "utilisation_mean_pct",
    "utilisation_p10_pct",
    "utilisation_samples",
    "sample_interval_s",
    "h2d_copy_s",
    "h2d_bytes",
    "h2d_note",
)


def probe(out: Path) -> int:
    """Import what the check needs; write TORCH_ENV. 1 (one line on stderr) when one is missing."""
    try:
        # cubebench's dependencies that its CLI imports only inside the commands
        import dask  # noqa: F401
        import jsonschema  # noqa: F401
        import numcodecs  # noqa: F401
        import torch
        import zarr  # noqa: F401

        import cubebench.cli  # noqa: F401
    except ImportError as error:
        why = f"{error} (install with WHEELS=DIR, see benchmarks/gpu_check.sh)"
        print(f"gpu_summary: error: {why}", file=sys.stderr)
        return 1
    from importlib import metadata

    cuda = torch.cuda.is_available()
    info = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "cubebench": metadata.version("cubebench"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "device_name": torch.cuda.get_device_name(0) if cuda else None,
    }
    (out / TORCH_ENV).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return 0


def _steps(out: Path) -> list[dict]:
    steps = []
    path = out / STEPS
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        name, rc, start, end, limit = line.split("\t")
        steps.append(
            {
                "name": name,
                "rc": None if rc == "skipped" else int(rc),
                "skipped": rc == "skipped",
                "seconds": round(float(end) - float(start), 3),
                "limit_s": int(limit),
                "timed_out": rc in ("124", "137"),
                "log": f"logs/{name}.log",
            }
        )
    return steps


def _side(result: dict | None, pass_name: str) -> dict:
    """One case on one pass: throughput, fit time, stall, accuracy (and the cuda pass' GPU)."""
    if result is None:
        return {"status": "missing", "reason": f"no result in runs/{pass_name}"}
    throughput = result.get("throughput") or {}
    timing = result.get("timing") or {}
    loading = result.get("loading") or {}
    metrics = result.get("metrics") or {}
    memory = result.get("memory") or {}
    side = {
        "status": result["status"],
        "reason": result.get("reason"),
        "device": result.get("device"),
        "threads": result.get("threads"),
        "samples_per_s": throughput.get("train_samples_per_s"),
        "train_samples": throughput.get("train_samples"),
        "fit_s": timing.get("fit_s"),
        "warmup_s": timing.get("warmup_s"),
        "total_s": timing.get("total_s"),
        "stall_fraction": loading.get("stall_fraction"),
        "stall_ci95": loading.get("stall_ci95"),
        "wait_fraction": loading.get("wait_fraction"),
        "time_to_first_batch_s": loading.get("time_to_first_batch_s"),
        "rmse": metrics.get("rmse"),
        "rmse_over_noise_floor": metrics.get("rmse_over_noise_floor"),
        "peak_rss_mb": memory.get("peak_rss_mb"),
        "gpu_peak_mb": memory.get("gpu_peak_mb"),
    }
    if pass_name == "cuda":
        block = result.get("gpu")  # absent in results written before cubebench.gpu
        if isinstance(block, dict):  # the named figures always there, null where not read
            side["gpu"] = {key: block.get(key) for key in GPU_KEYS} | block
        else:
            side["gpu"] = None
    return side


def _ratio(numerator, denominator) -> float | None:
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in (numerator, denominator)):
        return None
    return numerator / denominator if denominator > 0 else None


def _passes(out: Path, failures: list[str]) -> tuple[dict, dict]:
    """{pass: {case: result}} of the run directories, and {pass: error} where one is unreadable."""
    from cubebench.errors import CubebenchError
    from cubebench.results import load_run

    found: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for name in PASSES:
        try:
            _, results = load_run(out / "runs" / name)
        except CubebenchError as error:
            errors[name] = str(error)
            failures.append(f"{name} pass: {error}")
            results = []
        found[name] = {r["case"]: r for r in results if r.get("repeat", 0) == 0}
    return found, errors


def _loader(out: Path, expected: list[int], failures: list[str]) -> dict:
    rows, cube = [], None
    path = out / LOADER
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the step's timeout, or a warning
            continue
        if not isinstance(raw, dict) or "threads" not in raw:
            continue
        cube = raw.get("cube")
        items = "windows" if raw.get("geometry") == "patch" else "pairs"
        found = raw.get("sweep") or {}
        rows.append(
            {
                "threads": raw["threads"],
                "items": items,
                "samples_per_s": raw.get(f"{items}_per_s"),
                "raw_decode_per_s": raw.get(f"raw_decode_{items}_per_s"),
                "ratio_to_raw": raw.get("ratio_to_raw"),
                "ratio_to_raw_ci95": raw.get("ratio_to_raw_ci95"),
                "ratio_converged": raw.get("ratio_converged"),
                "measured_pairs": raw.get("epochs"),  # (reference, loader) pairs measured
                "reader": raw.get("reader"),
                "stall_fraction": raw.get("stall_fraction"),
                "peak_rss_mb": raw.get("peak_rss_mb"),
                "sustained_rate_at_90": raw.get("sustained_rate_at_90"),
                "sweep": {
                    "free_running_per_s": found.get("free_running_per_s"),
                    "sustained_rate_at_90": found.get("sustained_rate_at_90"),
                    "utilisation_at_best": found.get("utilisation_at_best"),
                    "bracket": found.get("bracket"),
                    "points": found.get("points", []),
                }
                if found
                else None,
            }
        )
    got = [row["threads"] for row in rows]
    if got != expected:
        failures.append(f"loader: rows for threads {got}, expected {expected}")
    by_threads = {row["threads"]: row["ratio_to_raw"] for row in rows}
    return {
        "cube": cube,
        "rows": rows,
        # the target on a 16-core host: the ratio at 8 threads within 20 % of that at 2
        "ratio_at_8_over_ratio_at_2": _ratio(by_threads.get(8), by_threads.get(2)),
    }


def summary(args: argparse.Namespace) -> int:
    from cubebench.results import read_environment

    out = args.out_dir
    failures: list[str] = []
    steps = _steps(out)
    for step in steps:
        if step["skipped"]:
            failures.append(f"step {step['name']}: skipped, the time budget was spent")
        elif step["rc"] != 0:
            why = " (timed out)" if step["timed_out"] else ""
            rc, log = step["rc"], step["log"]
            failures.append(f"step {step['name']}: exit status {rc}{why}, see {log}")
    found, errors = _passes(out, failures)
    cases = {}
    for case in CASES:
        sides = {name: _side(found[name].get(case), name) for name in PASSES}
        for name, side in sides.items():
            if side["status"] != "ok":
                failures.append(f"{case} ({name} pass): {side['status']}: {side['reason']}")
        cuda, cpu = sides["cuda"], sides["cpu"]
        ok = cuda["status"] == cpu["status"] == "ok"
        result = found["cuda"].get(case) or found["cpu"].get(case) or {}
        cases[case] = {
            "task": result.get("task"),
            **sides,
            "cuda_over_cpu_samples_per_s": (
                _ratio(cuda["samples_per_s"], cpu["samples_per_s"]) if ok else None
            ),
        }
    torch_env_path = out / TORCH_ENV
    torch_env = json.loads(torch_env_path.read_text()) if torch_env_path.exists() else {}
    run_env = read_environment(out / "runs" / "cuda") or read_environment(out / "runs" / "cpu")
    environment = {
        "gpu": run_env.get("gpu"),  # nvidia-smi's name, driver, memory (the run's manifest)
        "cuda_available": torch_env.get("cuda_available"),
        "torch": torch_env.get("torch") or (run_env.get("packages") or {}).get("torch"),
        "torch_cuda": torch_env.get("torch_cuda"),
        "torch_device_name": torch_env.get("device_name"),
        "python": torch_env.get("python") or run_env.get("python"),
        "cubebench": torch_env.get("cubebench"),
        "packages": run_env.get("packages"),
        "cpu": run_env.get("cpu"),
        "platform": run_env.get("platform"),
        "git_sha": run_env.get("git_sha"),
    }
    if not args.cpu_only and environment["cuda_available"] is False:
        failures.append("torch sees no CUDA device (the cuda pass cannot run)")
    loader = _loader(out, args.loader_threads, failures)
    loader["adapter"] = args.loader_adapter
    total = time.time() - args.started if args.started else sum(s["seconds"] for s in steps)
    document = {
        "format": FORMAT,
        "ok": not failures,
        "failures": failures,
        "cpu_only": args.cpu_only,
        "note": (
            "CPU_ONLY=1: no GPU; the 'cuda' pass ran with --device cpu on the tiny cube, so "
            "its figures are CPU figures and the ratios compare two CPU runs"
            if args.cpu_only
            else None
        ),
        "settings": {
            "cube": args.cube,
            "cases": list(CASES),
            "epochs": args.epochs,
            "threads": args.threads,
            "cuda_pass_device": "cpu" if args.cpu_only else "cuda",
            "loader_threads": args.loader_threads,
            "loader_adapter": args.loader_adapter,
            "budget_s": args.budget_s,
            "wheels": args.wheels or None,
        },
        "environment": environment,
        "cases": cases,
        "run_errors": errors,
        "loader": loader,
        "steps": steps,
        "total_s": round(total, 3),
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (out / SUMMARY).write_text(json.dumps(document, indent=2) + "\n")
    for failure in failures:
        print(f"gpu_check: failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _threads(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("out_dir", type=Path)
    p = sub.add_parser("summary")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--cube", required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--loader-threads", type=_threads, required=True)
    p.add_argument("--loader-adapter", required=True)
    p.add_argument("--budget-s", type=int, required=True)
    p.add_argument("--started", type=float, help="the check's start (seconds since the epoch)")
    p.add_argument("--wheels", default="")
    p.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "probe":
        return probe(args.out_dir)
    return summary(args)


if __name__ == "__main__":
    raise SystemExit(main())
