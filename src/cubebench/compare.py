"""Several runs side by side (`cubebench compare`): the CPU and the GPU image, two machines, two
chunk layouts. Each run's cases are aggregated as in its own report (means, Student-t 95 %
intervals over repeats); the runs are refused when they did not answer the same question (a
task on another cube, or another split) unless forced. `cubebench export` writes the results
of runs as one flat table (Parquet) for pandas or duckdb."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cubebench.display import fmt
from cubebench.errors import CubebenchError
from cubebench.report.plots import plot_accuracy_vs_throughput
from cubebench.report.render import CSS, embedded_png, html_table
from cubebench.report.tables import aggregate_table, get
from cubebench.results import load_run

BY = ("case", "library", "device", "image")


@dataclass
class Run:
    label: str
    path: Path
    manifest: dict
    results: list[dict]


def load_runs(run_dirs: Sequence[Path]) -> list[Run]:
    """The runs, labelled by their directory's name (with its parent's where two share one)."""
    paths = [Path(p) for p in run_dirs]
    if len(paths) < 2:
        raise CubebenchError("compare needs at least two run directories")
    names = [p.name for p in paths]
    runs = []
    for path, name in zip(paths, names, strict=True):
        if not path.is_dir():
            raise CubebenchError(f"no run directory {path}")
        manifest, found = load_run(path)
        if not found:
            raise CubebenchError(f"{path} holds no results")
        label = name if names.count(name) == 1 else f"{path.parent.name}/{name}"
        runs.append(Run(label, path, manifest, found))
    return runs


def question(result: dict) -> tuple:
    """What a result answers: its task on a cube (fingerprint) with a split; runs compared on
    a task must agree on it."""
    return (result.get("task"), get(result, "cube", "fingerprint"), result.get("split"))


def mismatches(runs: Sequence[Run]) -> list[str]:
    """One line per task that the runs answered differently (cube or split)."""
    seen: dict[str, dict[str, set]] = {}
    for run in runs:
        for result in run.results:
            task, fingerprint, split = question(result)
            asked = seen.setdefault(str(task), {})
            asked.setdefault(run.label, set()).add((fingerprint, split))
    lines = []
    for task, by_run in seen.items():
        distinct = {q for answers in by_run.values() for q in answers}
        if len(by_run) > 1 and len(distinct) > 1:
            shown = "; ".join(
                f"{label}: " + ", ".join(f"cube {f}, split {s}" for f, s in sorted(answers))
                for label, answers in by_run.items()
            )
            lines.append(f"task {task} differs between the runs ({shown})")
    return lines


def _image(result: dict) -> str:
    digest = get(result, "environment", "image", "digest")
    return str(digest)[:19] if digest else "no image"


def compare_rows(runs: Sequence[Run], by: str = "case") -> list[dict]:
    """One row per run and case (its repeats aggregated), grouped by `by` (case, library,
    device or image) so that what is compared sits together, the runs in the given order."""
    if by not in BY:
        raise CubebenchError(f"--by {by!r}: one of {', '.join(BY)}")
    rows = []
    for order, run in enumerate(runs):
        firsts = {}
        for result in run.results:
            firsts.setdefault(result["case"], result)
        for row in aggregate_table(run.results, repeats=run.manifest.get("repeat")):
            first = firsts.get(row["case"], {})
            row.update(
                run=run.label,
                run_order=order,
                device=first.get("device"),
                image=_image(first),
                library=first.get("library"),
            )
            rows.append(row)
    keys = list(dict.fromkeys(str(r[by]) for r in rows))
    return sorted(rows, key=lambda r: (keys.index(str(r[by])), r["case"], r["run_order"]))


COLUMNS = (  # (header, key, interval)
    ("RMSE", "rmse", True),
    ("RMSE / floor", "rmse_over_noise_floor", False),
    ("train samples/s", "train_samples_per_s", True),
    ("fit s", "fit_s", True),
    ("stall", "stall_fraction", False),
)


def _cell(row: dict, key: str, interval: bool) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    half = row.get(f"{key}_half_width") if interval else None
    return f"{fmt(value)} ± {fmt(half)}" if half is not None else fmt(value)


def table(rows: Sequence[dict], by: str) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison: the repeats (ok of asked), each figure's mean and,
    with two repeats or more, its 95 % interval half-width."""
    lead = [] if by == "case" else [by]
    header = [*lead, "case", "run", "device", "n"] + [h for h, _, _ in COLUMNS]
    body = []
    for row in rows:
        n = f"{row.get('n_ok', 0)}/{row.get('n_repeats', 0)}"
        cells = [str(row.get(k)) for k in lead]
        cells += [row["case"], row["run"], str(row.get("device")), n]
        body.append(cells + [_cell(row, key, ci) for _, key, ci in COLUMNS])
    return header, body


def write_compare(
    run_dirs: Sequence[Path], out: Path, by: str = "case", force: bool = False
) -> list[Path]:
    """compare.md, compare.html, compare.json and compare.png (accuracy vs throughput, a point
    per run and case) of the runs in `out`; runs that answered a
    task differently are refused (one line) unless `force`, which notes it in the report."""
    runs = load_runs(run_dirs)
    differ = mismatches(runs)
    if differ and not force:
        raise CubebenchError(f"{differ[0]}: these runs are not comparable (--force to compare)")
    rows = compare_rows(runs, by)
    header, body = table(rows, by)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    intro = [
        f"Runs: {', '.join(f'{r.label} ({r.path})' for r in runs)}.",
        "Each figure is the mean over a case's ok repeats; ± is the half-width of its 95 % "
        "Student-t interval (shown with two repeats or more; a single run has none).",
        *(f"Forced despite: {line}." for line in differ),
    ]
    plot = plot_accuracy_vs_throughput(
        [{**row, "case": f"{row['case']} · {row['run']}"} for row in rows], out / "compare.png"
    )
    md = ["# cubebench compare", "", *intro, ""]
    md += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    md += ["", f"![{plot.name}]({plot.name})"]
    (out / "compare.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    numeric = [False] * (len(header) - len(COLUMNS) - 1) + [True] * (len(COLUMNS) + 1)
    page = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cubebench compare</title>",
        f"<style>{CSS}</style></head><body><h1>cubebench compare</h1>",
        *(f"<p>{html.escape(p)}</p>" for p in intro),
        html_table(header, body, numeric),
        embedded_png(plot.name, plot.read_bytes()),
        "</body></html>",
    ]
    (out / "compare.html").write_text("\n".join(page), encoding="utf-8")
    summary = {"runs": [r.label for r in runs], "by": by, "forced": differ, "rows": rows}
    (out / "compare.json").write_text(json.dumps(summary, indent=1, default=str))
    return [out / "compare.md", out / "compare.html", out / "compare.json", plot]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted columns; lists (epochs, chunk shapes) as JSON text."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list):
        return {prefix[:-1]: json.dumps(tree)}
    return {prefix[:-1]: tree}


def export_parquet(run_dirs: Sequence[Path], path: Path) -> int:
    """One row per result of the runs, keys flattened (`metrics.rmse`,
    `environment.packages.torch`...), with `run_dir`; returns the number of rows."""
    import pandas as pd

    rows = []
    for run_dir in run_dirs:
        if not Path(run_dir).is_dir():
            raise CubebenchError(f"no run directory {run_dir}")
        _, found = load_run(Path(run_dir))
        rows += [{"run_dir": str(run_dir), **_flat(result)} for result in found]
    if not rows:
        raise CubebenchError("no results to export")
    frame = pd.DataFrame(rows)
    for column in frame.columns:  # a column mixing numbers and text (None-only fine) -> text
        kinds = {type(v) for v in frame[column] if v is not None}
        if len(kinds - {int, float, bool}) and len(kinds) > 1:
            frame[column] = frame[column].map(lambda v: None if v is None else str(v))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return len(frame)
