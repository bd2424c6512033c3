"""The stall's two methods side by side: the resident-step estimate (`stall_fraction`, the
definition every library shares) against the wait timed directly inside `next(batch)`
(`wait_fraction`, where the loop is ours: torch, scikit-learn). Their agreement validates the
estimate that Keras, whose input pipeline runs inside `fit`, has to rely on.

    python benchmarks/scripts/stall_methods.py RUN_DIR            # a finished run
    python benchmarks/scripts/stall_methods.py --run [--repeat 3] # run the cases first

One row per result (every repeat), then the mean difference per case with its 95 % interval.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from cubebench.results import load_run
from cubebench.stats import summarize

CASES = "torch-mlp,torch-cnn,sklearn-sgd,sklearn-hgb-gapfill"


def table(run_dir: Path) -> list[dict]:
    _, found = load_run(run_dir)
    rows = []
    for r in found:
        loading = r.get("loading") or {}
        stall, wait = loading.get("stall_fraction"), loading.get("wait_fraction")
        if r.get("status") != "ok" or stall is None or wait is None:
            continue
        rows.append(
            {
                "case": r["case"],
                "repeat": r.get("repeat", 0),
                "stall": 100 * stall,
                "ci95": 100 * (loading.get("stall_ci95") or 0.0),
                "wait": 100 * wait,
                "difference": 100 * (stall - wait),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path)
    parser.add_argument("--run", action="store_true", help="run the cases first")
    parser.add_argument("--cube", default="synthetic:small")
    parser.add_argument("--cases", default=CASES)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    run_dir = args.run_dir
    if args.run:
        run_id = "stall-methods"
        cmd = [sys.executable, "-m", "cubebench", "run", "--cube", args.cube, "--cases"]
        cmd += [args.cases, "--repeat", str(args.repeat), "--no-tracking", "--out", str(args.out)]
        subprocess.run([*cmd, "--run-id", run_id], check=False)
        run_dir = args.out / run_id
    if run_dir is None:
        parser.error("give a run directory or --run")
    rows = table(run_dir)
    print(f"{'case':<22}{'repeat':>7}{'stall %':>10}{'± 95 %':>8}{'wait %':>9}{'diff pp':>9}")
    for row in rows:
        print(
            f"{row['case']:<22}{row['repeat']:>7}{row['stall']:>10.2f}{row['ci95']:>8.2f}"
            f"{row['wait']:>9.2f}{row['difference']:>9.2f}"
        )
    print()
    for case in dict.fromkeys(r["case"] for r in rows):
        diff = summarize([r["difference"] for r in rows if r["case"] == case])
        half = diff["half_width"]
        interval = f" ± {half:.2f}" if half is not None else " (one run)"
        print(f"{case}: estimate − measured wait = {diff['mean']:+.2f}{interval} pp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
