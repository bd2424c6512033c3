"""`cubebench report`: a run directory rendered as Markdown, a self-contained HTML page, plots,
and a machine-readable summary.

`write_report(run_dir)` reads `run.json`, `environment.json` and the result files (every repeat
of every case, validated by `cubebench.results.load_run`; version 1 runs too) and writes into
the run directory:

- `report.md` and `report.html`: one section per task (a sample of one task, a pixel, is not
  a sample of another, a window: tasks are never mixed in a table, a ranking or a plot), each
  with its case table (mean ± 95 % interval over the repeats; failed repeats counted and
  named, never averaged in), the throughput and time-to-quality rankings, the significance of
  the differences between libraries, the transfer table where there is one, and its plot;
  then the run-wide plots and the environment;
- `summary.json` (`SUMMARY_JSON`): per task, per case the counts and aggregates, and the
  comparisons (p, Holm-adjusted p, significant);
- `accuracy_vs_throughput-<task>.png` per task (`plot_name(task)`), `ACCURACY_PNG` (every
  task, a panel each), `LOADING_PNG`, `LOSS_PNG`.

The package: `tables` (rows, aggregation, comparisons), `render` (Markdown, HTML), `plots`.
`RunResults` shows the same in a notebook. matplotlib is imported inside the plotting
functions only, so importing this package is cheap.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cubebench.display import MISSING, facts_table, fmt
from cubebench.errors import CubebenchError
from cubebench.report.plots import (
    plot_accuracy_vs_throughput,
    plot_loading_vs_compute,
    plot_loss_curves,
)
from cubebench.report.render import (
    Column,
    columns,
    facts_html,
    html_section,
    one_line,
    render_html,
    render_markdown,
    shows_gpu,
    status_text,
    title,
    units_of,
)
from cubebench.report.tables import (
    AGGREGATED,
    ALPHA,
    TaskSection,
    aggregate_table,
    comparison_table,
    get,
    plot_name,
    results_table,
    summary,
    task_sections,
    transfer_table,
)
from cubebench.results import ENVIRONMENT, RUN_MANIFEST, SUMMARY, load_run, write_json_atomic

__all__ = [
    "ACCURACY_PNG",
    "AGGREGATED",
    "ALPHA",
    "LOADING_PNG",
    "LOSS_PNG",
    "MISSING",
    "OUTPUTS",
    "PLOTS",
    "REPORT_HTML",
    "REPORT_MD",
    "SUMMARY_JSON",
    "Column",
    "RunResults",
    "TaskSection",
    "aggregate_table",
    "columns",
    "comparison_table",
    "facts_table",
    "fmt",
    "plot_accuracy_vs_throughput",
    "plot_loading_vs_compute",
    "plot_loss_curves",
    "plot_name",
    "render_html",
    "render_markdown",
    "results_table",
    "summary",
    "task_sections",
    "transfer_table",
    "write_report",
]

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
SUMMARY_JSON = SUMMARY  # summary.json
OUTPUTS = (REPORT_MD, REPORT_HTML, SUMMARY_JSON)  # the documents; the plots: PLOTS + plot_name
ACCURACY_PNG = "accuracy_vs_throughput.png"  # every task, a panel each
LOADING_PNG = "loading_vs_compute.png"
LOSS_PNG = "loss_curves.png"
PLOTS = (ACCURACY_PNG, LOADING_PNG, LOSS_PNG)  # run-wide; per task: plot_name(task)
RUN_PLOTS_SHOWN = (LOADING_PNG, LOSS_PNG)  # under "Plots": the tasks' own are in their sections


def _load(run_dir: Path) -> tuple[dict, list[dict], dict | None]:
    """(manifest, results, environment) of a run directory, or a one-line CubebenchError."""

    def read(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise CubebenchError(f"{path} cannot be read: {one_line(error, 200)}") from None

    manifest_path = run_dir / RUN_MANIFEST
    if manifest_path.is_file() and not isinstance(read(manifest_path), dict):
        raise CubebenchError(f"{manifest_path} is not a run manifest (not a JSON object)")
    try:
        manifest, results = load_run(run_dir)
    except CubebenchError as error:
        raise CubebenchError(one_line(error, 500)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise CubebenchError(f"{run_dir}: cannot read a result: {one_line(error, 200)}") from None
    env_path = run_dir / ENVIRONMENT
    env = read(env_path) if env_path.exists() else None
    if env is not None and not isinstance(env, dict):
        raise CubebenchError(f"{env_path} is not an environment manifest (not a JSON object)")
    if env is None:  # every result carries the environment too
        env = next(
            (r["environment"] for r in results if isinstance(r.get("environment"), dict)), None
        )
    images = images_used(results)
    if env is not None and len(images) > 1:  # a run joined across images (`bench-gpu`)
        env = {**env, "images": images}
    return manifest, results, env


def images_used(results: list[dict]) -> list[dict]:
    """Each image the run's cases ran in (digest, lock hash), with its cases and their
    libraries' versions, in the order the cases come."""
    found: dict[tuple, dict] = {}
    for result in results:
        image = get(result, "environment", "image") or {}
        key = (image.get("digest"), image.get("lock_hash"))
        entry = found.setdefault(
            key, {"digest": key[0], "lock_hash": key[1], "cases": [], "libraries": {}}
        )
        if result["case"] not in entry["cases"]:
            entry["cases"].append(result["case"])
        if result.get("library_version"):
            entry["libraries"][result["library"]] = result["library_version"]
    return list(found.values())


def _cases(manifest: dict) -> list[str] | None:
    cases = manifest.get("cases")
    return cases if isinstance(cases, list) else None


def _repeats(manifest: dict) -> int:
    """Repeats per case the run asked for: `repeat` of run.json, 1 in runs before it."""
    repeat = manifest.get("repeat", 1)
    return repeat if isinstance(repeat, int) and not isinstance(repeat, bool) and repeat > 0 else 1


def _plotters(
    sections: list[TaskSection], results: list[dict]
) -> dict[str, Callable[[Path], Path]]:
    """File name -> function drawing it, for every plot of the report."""
    rows = [row for s in sections for row in s.rows if s.task is not None]
    plotters: dict[str, Callable[[Path], Path]] = {
        ACCURACY_PNG: lambda p: plot_accuracy_vs_throughput(rows, p),
        LOADING_PNG: lambda p: plot_loading_vs_compute(rows, p),
        LOSS_PNG: lambda p: plot_loss_curves(results, p),
    }
    for section in sections:
        if section.plot:
            plotters[section.plot] = lambda p, s=section: plot_accuracy_vs_throughput(s.rows, p)
    return plotters


class Png(bytes):
    """PNG bytes that Jupyter shows as an image."""

    def _repr_png_(self) -> bytes:
        return bytes(self)


class RunResults:
    """A results directory (`cubebench run`) in a notebook: the report's aggregate table as a
    pandas DataFrame (`table()`, one row per case), every repeat (`repeats_table()`), the
    comparisons, the summary, the report's sections as HTML (`_repr_html_`) and its plots
    (`plot(name)`, PNG). Everything comes from the functions `write_report` uses."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.manifest, self.results, self.environment = _load(self.run_dir)
        cases, repeats = _cases(self.manifest), _repeats(self.manifest)
        self.sections = task_sections(self.results, cases, repeats)
        self.rows = [row for section in self.sections for row in section.rows]  # per case
        self.result_rows = results_table(self.results, cases)  # per result file
        self.comparisons = [c for section in self.sections for c in section.comparisons]
        self.transfer = transfer_table(self.results)

    @property
    def cases(self) -> list[str]:
        """Every case of the run: the manifest's list, then any other result file's case."""
        order = {row["case"]: i for i, row in enumerate(results_table(self.results))}
        listed = _cases(self.manifest) or []
        rest = [c for c in order if c not in listed]
        return [*map(str, listed), *rest]

    @property
    def tasks(self) -> list[str]:
        return [s.task for s in self.sections if s.task is not None]

    def table(self, raw: bool = False, task: str | None = None):
        """One row per case (index: case), aggregated over its repeats. `raw=False`: the
        report's columns and headers with unrounded means, and a "<header> ±" column with the
        half width of the 95 % interval next to each aggregated one; `raw=True`: every key of
        `aggregate_table`'s rows. `task`: that task's cases only."""
        import pandas as pd

        rows = [r for r in self.rows if task is None or r.get("task") == task]
        frame = pd.DataFrame(rows)
        if not raw:
            data = {}
            for c in columns(units_of(rows), task=task is None, gpu=shows_gpu(rows)):
                if c.key == "status":
                    data[c.header] = [status_text(r) for r in rows]
                    continue
                data[c.header] = [r.get(c.key) for r in rows]
                if c.interval:
                    data[f"{c.header} ±"] = [r.get(c.interval) for r in rows]
            frame = pd.DataFrame(data)
        return frame.set_index(frame.columns[0]) if len(frame.columns) else frame

    def repeats_table(self):
        """One row per result file (index: case, repeat), every key of `results_table`."""
        import pandas as pd

        frame = pd.DataFrame(self.result_rows)
        if "repeat" not in frame:
            frame["repeat"] = 0
        return frame.set_index(["case", "repeat"])

    def comparisons_frame(self):
        """The significance tables of every task: one row per task, metric and pair."""
        import pandas as pd

        return pd.DataFrame(self.comparisons)

    def summary(self) -> dict:
        """What `write_report` writes to summary.json."""
        return summary(self.manifest, self.sections)

    def transfer_frame(self):
        """RMSE per predictor and the transfer gain (means over the repeats) of the cases that
        evaluated several."""
        import pandas as pd

        names, rows = self.transfer
        data = [{"case": r["case"], **r["rmse"], "transfer_gain": r["transfer_gain"]} for r in rows]
        return pd.DataFrame(data, columns=["case", *names, "transfer_gain"]).set_index("case")

    def plot(self, name: str = ACCURACY_PNG) -> Png:
        """One of the report's plots (`PLOTS`, or a task's `plot_name(task)`), drawn afresh."""
        import tempfile

        plotters = _plotters(self.sections, self.results)
        if name not in plotters:
            raise KeyError(f"unknown plot {name!r}; plots: {', '.join(plotters)}")
        with tempfile.TemporaryDirectory() as tmp:
            return Png(plotters[name](Path(tmp) / name).read_bytes())

    def _repr_html_(self) -> str:
        heading, facts = title(self.manifest)
        parts = [f"<h3>{html.escape(heading)}</h3>", facts_html(facts)]
        for section in self.sections:
            parts += html_section(section, level=4)
        return "\n".join(parts)


def write_report(run_dir: Path) -> list[Path]:
    """Write report.md, report.html, summary.json and the plots into `run_dir`; return their
    paths (the documents first).

    A directory that is not a readable cubebench run raises `CubebenchError` (one line)."""
    run_dir = Path(run_dir)
    manifest, results, env = _load(run_dir)
    sections = task_sections(results, _cases(manifest), _repeats(manifest))
    try:
        pngs = [plot(run_dir / name) for name, plot in _plotters(sections, results).items()]
        images = {p.name: p.read_bytes() for p in pngs}
        md = run_dir / REPORT_MD
        text = render_markdown(manifest, sections, env, RUN_PLOTS_SHOWN)
        md.write_text(text, encoding="utf-8")
        page = run_dir / REPORT_HTML
        page.write_text(
            render_html(manifest, sections, env, images, RUN_PLOTS_SHOWN), encoding="utf-8"
        )
        summary_path = run_dir / SUMMARY_JSON
        write_json_atomic(summary_path, summary(manifest, sections))
    except OSError as error:
        raise CubebenchError(
            f"cannot write the report into {run_dir}: {one_line(error, 200)}"
        ) from None
    return [md, page, summary_path, *pngs]
