"""The CI performance gate: run the asv suite on two commits and fail when HEAD got worse.

    python -m benchmarks.scripts.gate [--base HEAD~1] [--head HEAD] [--bench REGEX ...] [--factor 3]

Both commits run in the current environment (asv's `--python=same`), each from its own git
worktree put first on the import path (`ASV_PYTHONPATH`), with HEAD's benchmark code, as
`asv continuous` does in managed environments. The verdicts follow what is noisy and what is
not on a shared machine:

- exact counters (chunks decoded, bytes read, read amplification) must not grow at all;
- accuracy (test RMSE, RMSE over the noise floor) is deterministic for a seed and may grow
  by `--rmse-tolerance` at most (relative);
- timings, memory and throughput are printed and fail only beyond `--factor`;
- a benchmark that worked on BASE and fails on HEAD fails the gate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

EXACT = {"track_chunks_decoded", "track_bytes_read", "track_read_amplification"}
ACCURACY = {"track_test_rmse", "track_rmse_over_noise_floor"}
HIGHER_IS_BETTER = {"track_ratio_to_raw", "track_train_samples_per_s", "track_sustained_rate_at_90"}
MACHINE = "cubebench-gate"


@dataclass(frozen=True)
class Verdict:
    benchmark: str
    kind: str  # exact | accuracy | timing | info
    base: float | None
    head: float | None
    failed: bool
    why: str

    @property
    def ratio(self) -> float | None:
        if self.base is None or self.head is None or self.base == 0:
            return None
        return self.head / self.base


def kind_of(benchmark: str) -> str:
    method = benchmark.split("(")[0].rsplit(".", 1)[-1]
    if method in EXACT:
        return "exact"
    if method in ACCURACY:
        return "accuracy"
    if method.startswith(("time_", "peakmem_")) or method in HIGHER_IS_BETTER:
        return "timing"
    return "info"


def judge(
    benchmark: str,
    base: float | None,
    head: float | None,
    factor: float = 3.0,
    rmse_tolerance: float = 0.01,
) -> Verdict:
    """The verdict on one benchmark (one parameter set) between BASE and HEAD; None is a
    benchmark that failed."""
    kind = kind_of(benchmark)

    def verdict(failed: bool, why: str) -> Verdict:
        return Verdict(benchmark, kind, base, head, failed, why)

    if head is None:
        return verdict(True, "fails on HEAD" if base is not None else "fails on both")
    if base is None:
        return verdict(False, "fixed on HEAD")
    if kind == "exact":
        worse = head > base * (1 + 1e-9)
        return verdict(worse, "counter grew" if worse else "")
    if kind == "accuracy":
        worse = head > base * (1 + rmse_tolerance)
        return verdict(worse, f"worse by more than {rmse_tolerance:.1%}" if worse else "")
    if kind == "timing":
        higher_is_better = benchmark.split("(")[0].rsplit(".", 1)[-1] in HIGHER_IS_BETTER
        worse = head < base / factor if higher_is_better else head > base * factor
        return verdict(worse, f"worse by more than {factor:g}x" if worse else "")
    return verdict(False, "")


def read_results(results_dir: Path, sha: str, machine: str = MACHINE) -> dict[str, float | None]:
    """`module.Class.method(params)` -> value (None where it failed) for every benchmark asv
    ran on a commit; asv keeps NaN for parameter sets it did not run, which are left out."""
    from asv.results import iter_results_for_machine_and_hash

    values: dict[str, float | None] = {}
    for result in iter_results_for_machine_and_hash(str(results_dir), machine, sha):
        for key in result.get_all_result_keys():
            params = result.get_result_params(key)
            found = result.get_result_value(key, params)
            combos = itertools.product(*params) if params else []
            names = [f"{key}({', '.join(p)})" for p in combos] or [key]
            values.update(
                (name, value)
                for name, value in zip(names, found, strict=True)
                if not (isinstance(value, float) and math.isnan(value))
            )
    return values


def compare(
    base: dict[str, float | None], head: dict[str, float | None], **limits: float
) -> list[Verdict]:
    """A verdict for every benchmark HEAD ran; one BASE did not run is new."""
    return [
        judge(name, base[name], head[name], **limits)
        if name in base
        else Verdict(name, kind_of(name), None, head[name], head[name] is None, "new")
        for name in sorted(head)
    ]


def render(verdicts: list[Verdict]) -> str:
    def number(value: float | None) -> str:
        return "failed" if value is None else f"{value:.6g}"

    rows = [("", "benchmark", "kind", "BASE", "HEAD", "HEAD/BASE", "")]
    for v in verdicts:
        ratio = "" if v.ratio is None else f"{v.ratio:.3f}"
        mark = "FAIL" if v.failed else ""
        rows.append((mark, v.benchmark, v.kind, number(v.base), number(v.head), ratio, v.why))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def gate_config(config: Path, work: Path) -> Path:
    """The repository's asv configuration with absolute paths and results kept in `work`, so
    that no earlier run's numbers take part."""
    from asv.util import load_json

    conf = load_json(str(config), js_comments=True)
    root = config.parent.resolve()
    conf.update(
        repo=str((root / conf.get("repo", ".")).resolve()),
        benchmark_dir=str((root / conf.get("benchmark_dir", "benchmarks")).resolve()),
        results_dir=str(work / "results"),
        html_dir=str(work / "html"),
        env_dir=str(work / "env"),
    )
    path = work / "asv.conf.json"
    path.write_text(json.dumps(conf, indent=2))
    return path


def run_commit(config: Path, repo: Path, sha: str, work: Path, asv_args: list[str]) -> None:
    """The selected benchmarks on one commit: its worktree's `src/` first on the import path."""
    tree = work / f"tree-{sha[:12]}"
    _git(repo, "worktree", "add", "--detach", str(tree), sha)
    try:
        env = {**os.environ, "ASV_PYTHONPATH": str(tree / "src")}
        asv = [sys.executable, "-m", "asv", "run", "--config", str(config), "--python=same"]
        asv += ["--set-commit-hash", sha, "--machine", MACHINE, *asv_args]
        print(f"--- {sha[:12]}: {' '.join(asv[2:])}", flush=True)
        subprocess.run(asv, check=True, env=env)
    finally:
        _git(repo, "worktree", "remove", "--force", str(tree))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD~1")
    parser.add_argument("--head", default="HEAD")
    parser.add_argument("--config", type=Path, default=Path("asv.conf.json"))
    parser.add_argument("--bench", "-b", action="append", default=[], help="asv regex")
    parser.add_argument("--factor", type=float, default=3.0, help="for timings (default 3)")
    parser.add_argument("--rmse-tolerance", type=float, default=0.01, help="relative")
    parser.add_argument("--full", action="store_true", help="all asv samples, not --quick")
    args = parser.parse_args(argv)
    repo = args.config.parent.resolve()
    try:
        base = _git(repo, "rev-parse", "--verify", f"{args.base}^{{commit}}")
    except subprocess.CalledProcessError:
        print(f"gate: no commit {args.base} to compare with (first commit or shallow clone)")
        return 0
    head = _git(repo, "rev-parse", "--verify", f"{args.head}^{{commit}}")
    asv_args = ["--show-stderr", "--durations=all"] + ([] if args.full else ["--quick"])
    asv_args += [a for regex in args.bench for a in ("--bench", regex)]
    subprocess.run(
        [sys.executable, "-m", "asv", "machine", "--yes", "--machine", MACHINE],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with tempfile.TemporaryDirectory(prefix="cubebench-gate-") as tmp:
        work = Path(tmp)
        config = gate_config(args.config, work)
        for sha in (base, head):
            run_commit(config, repo, sha, work, asv_args)
        verdicts = compare(
            read_results(work / "results", base),
            read_results(work / "results", head),
            factor=args.factor,
            rmse_tolerance=args.rmse_tolerance,
        )
    print(f"\ngate: {base[:12]} (BASE) -> {head[:12]} (HEAD)")
    print(render(verdicts))
    failed = [v for v in verdicts if v.failed]
    if not verdicts:
        print("gate: no benchmark ran", file=sys.stderr)
        return 1
    if failed:
        print(f"gate: {len(failed)} of {len(verdicts)} benchmarks got worse", file=sys.stderr)
        return 1
    print(f"gate: {len(verdicts)} benchmarks, none got worse")
    return 0


if __name__ == "__main__":
    sys.exit(main())
