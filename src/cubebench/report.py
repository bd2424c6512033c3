"""`cubebench report`: a run directory rendered as Markdown, a self-contained HTML page and plots.

`write_report(run_dir)` reads `run.json`, `environment.json` and the case results (validated by
`cubebench.results.load_run`) and writes into the run directory:

- `report.md` and `report.html`: the same tables (one row per case, failed ones included; a
  transfer table when a case evaluated several predictors) and the environment;
- `accuracy_vs_throughput.png`, `loading_vs_compute.png`, `loss_curves.png`.

The rows come from `results_table(results)` (raw values, one dict per case, also handy in a
notebook: `pandas.DataFrame(results_table(results))`); both documents format the same rows.
matplotlib is imported inside the plotting functions and draws on an Agg canvas of its own, so
importing this module is cheap and the caller's pyplot state and backend are left alone.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cubebench.errors import CubebenchError
from cubebench.results import ENVIRONMENT, PACKAGES, RUN_MANIFEST, load_run

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
ACCURACY_PNG = "accuracy_vs_throughput.png"
LOADING_PNG = "loading_vs_compute.png"
LOSS_PNG = "loss_curves.png"
PLOTS = (ACCURACY_PNG, LOADING_PNG, LOSS_PNG)

MISSING = "—"
ESTIMATED_MARK = "~"  # prefix of a stall % that was estimated, not measured
REASON_WIDTH = 80


# --------------------------------------------------------------------------------------------
# rows


@dataclass(frozen=True)
class Column:
    key: str  # key of a `results_table` row
    header: str
    numeric: bool = True


def columns(units: str | None = "K") -> list[Column]:
    """The main table's columns; `units` (of the target) goes into the error headers."""
    u = f" [{units}]" if units else ""
    return [
        Column("case", "case", numeric=False),
        Column("task", "task", numeric=False),  # samples are pixels, or windows (patch tasks)
        Column("library", "library", numeric=False),
        Column("status", "status", numeric=False),
        Column("rmse", f"RMSE{u}"),
        Column("rmse_over_noise_floor", "RMSE / noise floor"),
        Column("mae", f"MAE{u}"),
        Column("r2", "R²"),
        Column("bias", f"bias{u}"),
        Column("train_samples_per_s", "train samples/s"),
        Column("predict_samples_per_s", "predict samples/s"),
        Column("fit_s", "fit s"),
        Column("stall_percent", "stall %"),
        Column("read_amplification", "read ampl."),
        Column("peak_rss_mb", "peak RSS MB"),
    ]


def _get(mapping: Any, *keys: str) -> Any:
    """mapping[k1][k2]... or None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _number(value: Any) -> float | None:
    """A finite number, or None (missing, null, NaN, inf, not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def one_line(text: Any, width: int = REASON_WIDTH) -> str:
    """`text` on one line (whitespace collapsed), cut to `width` characters with an ellipsis."""
    line = " ".join(str(text).split())
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


def results_table(results: Sequence[dict], cases: Iterable[str] | None = None) -> list[dict]:
    """One row of raw values per case result, in the given order (keys: see `columns()` plus
    `library_name`, `library_version`, `stall_method`, `fit_wait_s`, `units`, `reason` in
    full). Numbers are unrounded floats or None. Names in `cases` without a result (an
    interrupted run) get a row with status "missing"."""
    rows = []
    for r in results:
        metrics = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
        name, version = r.get("library") or None, r.get("library_version")
        stall = _number(_get(r, "loading", "stall_fraction"))
        fit_s = _number(_get(r, "timing", "fit_s"))
        rows.append(
            {
                "case": str(r.get("case", "?")),
                "task": r.get("task"),
                "library": " ".join(str(v) for v in (name, version) if v) or None,
                "library_name": name,
                "library_version": version,
                "status": r.get("status"),
                "reason": r.get("reason"),
                "units": metrics.get("units"),
                "rmse": _number(metrics.get("rmse")),
                "rmse_over_noise_floor": _number(metrics.get("rmse_over_noise_floor")),
                "noise_floor_rmse": _number(metrics.get("noise_floor_rmse")),
                "mae": _number(metrics.get("mae")),
                "r2": _number(metrics.get("r2")),
                "bias": _number(metrics.get("bias")),
                "train_samples_per_s": _number(_get(r, "throughput", "train_samples_per_s")),
                "predict_samples_per_s": _number(_get(r, "throughput", "predict_samples_per_s")),
                "fit_s": fit_s,
                "stall_fraction": stall,
                "stall_percent": None if stall is None else 100.0 * stall,
                "stall_method": _get(r, "loading", "stall_method"),
                "fit_wait_s": None if stall is None or fit_s is None else fit_s * stall,
                "read_amplification": _number(_get(r, "loading", "read_amplification")),
                "peak_rss_mb": _number(_get(r, "memory", "peak_rss_mb")),
            }
        )
    seen = {row["case"] for row in rows}
    for name in map(str, cases or ()):
        if name not in seen:
            seen.add(name)
            rows.append({"case": name, "status": "missing", "reason": "no result file"})
    return rows


def transfer_table(results: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """(predictor names, rows) of the results that evaluated more than one predictor
    (`metrics.by_predictor`): a row has `case`, `rmse` by predictor name, `transfer_gain`.
    Predictor names keep the order in which the cases list them (the case's own first)."""
    names: list[str] = []
    rows = []
    for r in results:
        by_predictor = _get(r, "metrics", "by_predictor")
        if not isinstance(by_predictor, dict) or len(by_predictor) < 2:
            continue
        for name in by_predictor:
            if name not in names:
                names.append(name)
        rows.append(
            {
                "case": str(r.get("case", "?")),
                "rmse": {k: _number(_get(v, "rmse")) for k, v in by_predictor.items()},
                "transfer_gain": _number(_get(r, "metrics", "transfer_gain")),
            }
        )
    return names, rows


def _units(rows: Sequence[dict]) -> str | None:
    """The target's units when every evaluated case agrees on them."""
    units = {row["units"] for row in rows if row.get("units")}
    return units.pop() if len(units) == 1 else None


# --------------------------------------------------------------------------------------------
# formatting


def fmt(value: Any) -> str:
    """A number to 3 significant digits, plainly: 1.23, 0.0123, 12.3, 123, 12,300; tiny
    numbers in exponent form; None, NaN and inf as "—"."""
    x = _number(value)
    if x is None:
        return MISSING
    if x == 0:
        return "0"
    rounded = float(f"{x:.3g}")
    exponent = math.floor(math.log10(abs(rounded)))
    if exponent < -3:
        return f"{rounded:.2e}"
    if exponent >= 3:
        return f"{round(rounded):,}"
    return f"{rounded:.{max(0, 2 - exponent)}f}"


def _cell(row: dict, column: Column) -> str:
    value = row.get(column.key)
    if column.key == "status":
        status = value or MISSING
        reason = row.get("reason")
        return f"{status}: {one_line(reason)}" if status != "ok" and reason else status
    if column.key == "stall_percent" and value is not None:
        mark = ESTIMATED_MARK if row.get("stall_method") == "estimated" else ""
        return mark + fmt(value)
    if not column.numeric:
        return MISSING if value is None else str(value)
    return fmt(value)


def _cells(rows: Sequence[dict], cols: Sequence[Column]) -> list[list[str]]:
    return [[_cell(row, c) for c in cols] for row in rows]


def _transfer_cells(
    names: Sequence[str], rows: Sequence[dict], units: str | None
) -> tuple[list[str], list[list]]:
    u = f" [{units}]" if units else ""
    headers = ["case", *[f"RMSE {n}{u}" for n in names], "transfer gain"]
    cells = [
        [row["case"], *[fmt(row["rmse"].get(n)) for n in names], fmt(row["transfer_gain"])]
        for row in rows
    ]
    return headers, cells


def _title(manifest: dict) -> tuple[str, list[tuple[str, str]]]:
    """The title and the (label, value) facts under it."""
    cube = manifest.get("cube")
    if isinstance(cube, dict):
        cube = cube.get("spec") or cube.get("path") or cube
    facts = [
        ("cube", cube),
        ("device", manifest.get("device")),
        ("started", manifest.get("started_at")),
        ("finished", manifest.get("finished_at")),
        ("epochs", manifest.get("epochs")),
    ]
    status = manifest.get("status")
    if status and status != "finished":  # still running, or interrupted
        facts.append(("run status", f"{status} (not finished)"))
    title = f"cubebench run {manifest.get('run_id', '?')}"
    return title, [(k, one_line(v, 200)) for k, v in facts if v is not None]


def _environment_facts(env: dict | None) -> list[tuple[str, str]]:
    if not env:
        return [("environment", "not recorded")]
    facts = []
    python = env.get("python")
    if python:
        facts.append(("python", f"{python} ({env.get('implementation') or 'CPython'})"))
    cpu = env.get("cpu") if isinstance(env.get("cpu"), dict) else {}
    if cpu:
        count = f", {cpu['count']} logical cores" if cpu.get("count") else ""
        facts.append(("CPU", f"{cpu.get('model') or '?'}{count}"))
    gpu = env.get("gpu")
    if isinstance(gpu, dict):
        details = [f"driver {gpu['driver']}" if gpu.get("driver") else None, gpu.get("memory")]
        details = ", ".join(str(d) for d in details if d)
        text = f"{gpu.get('count') or 1} × {gpu.get('name') or '?'}"
        facts.append(("GPU", text + (f" ({details})" if details else "")))
    elif "gpu" in env:
        facts.append(("GPU", "none"))
    threads = _get(env, "threads", "per_case")
    if threads:
        facts.append(("threads per case", str(threads)))
    packages = env.get("packages") if isinstance(env.get("packages"), dict) else {}
    listed = [f"{name} {packages[name]}" for name in PACKAGES if packages.get(name)]
    if listed:
        facts.append(("packages", ", ".join(listed)))
    if env.get("platform"):
        facts.append(("platform", str(env["platform"])))
    facts.append(("git", str(env.get("git_sha") or "unknown")))
    digest = _get(env, "image", "digest")
    if digest:
        facts.append(("image", str(digest)))
    return [(k, one_line(v, 300)) for k, v in facts]


# --------------------------------------------------------------------------------------------
# Markdown


def _md_escape(text: str) -> str:
    """Text in a Markdown table cell: no pipes, no raw HTML."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _md_table(
    headers: Sequence[str], cells: Sequence[Sequence[str]], numeric: Sequence[bool]
) -> str:
    head = [_md_escape(h) for h in headers]
    body = [[_md_escape(c) for c in row] for row in cells]
    widths = [max(3, len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)
        )
        + "|"
    )
    return "\n".join([line(head), rule, *(line(row) for row in body)])


def render_markdown(
    manifest: dict,
    rows: Sequence[dict],
    transfer: tuple[list[str], list[dict]],
    env: dict | None,
    plots: Sequence[str] = PLOTS,
) -> str:
    title, facts = _title(manifest)
    cols = columns(_units(rows))
    out = [f"# {_md_escape(title)}", ""]
    out += [f"- **{k}**: {_md_escape(v)}" for k, v in facts]
    out += ["", "## Cases", ""]
    out.append(_md_table([c.header for c in cols], _cells(rows, cols), [c.numeric for c in cols]))
    out += ["", _legend(rows)]
    names, transfer_rows = transfer
    if transfer_rows:
        headers, cells = _transfer_cells(names, transfer_rows, _units(rows))
        out += ["", "## Transfer learning", ""]
        out.append(_md_table(headers, cells, [False] + [True] * (len(headers) - 1)))
        out += ["", _TRANSFER_LEGEND]
    out += ["", "## Plots", ""]
    for name in plots:
        out += [f"![{name}]({name})", ""]
    out.pop()
    out += ["", "## Environment", ""]
    out += [f"- **{k}**: {_md_escape(v)}" for k, v in _environment_facts(env)]
    return "\n".join(out) + "\n"


def _legend(rows: Sequence[dict]) -> str:
    text = (
        "RMSE, MAE and bias (prediction − truth) on the evaluated part, in the target's units; "
        "RMSE / noise floor: about 1 is the best any model can reach. Samples/s over the fit "
        "and the prediction; stall %: share of the fit spent waiting for batches"
    )
    if any(row.get("stall_method") == "estimated" for row in rows):
        text += f" ({ESTIMATED_MARK} estimated, not measured)"
    return text + "; read ampl.: decoded bytes / bytes of the chunks needed (1 = no chunk twice)."


_TRANSFER_LEGEND = (
    "RMSE of each predictor on the case's evaluated part (the target region); a case's own "
    "result is the first predictor it lists. Transfer gain as the case defines it."
)


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.failed td, tr.missing td { color: #a00; }
p.legend { font-size: 0.85em; color: #555; max-width: 70em; }
img { max-width: 100%; margin: 0.5em 0; border: 1px solid #eee; }
ul.facts { list-style: none; padding-left: 0; } ul.facts li { margin: 0.15em 0; }
"""


def _html_table(
    headers: Sequence[str],
    cells: Sequence[Sequence[str]],
    numeric: Sequence[bool],
    row_classes: Sequence[str] | None = None,
) -> str:
    def cls(num: bool) -> str:
        return ' class="num"' if num else ""

    e = html.escape
    out = [
        "<table>",
        "<tr>" + "".join(f"<th{cls(n)}>{e(h)}</th>" for h, n in zip(headers, numeric)) + "</tr>",
    ]
    for i, row in enumerate(cells):
        klass = f' class="{e(row_classes[i])}"' if row_classes and row_classes[i] else ""
        tds = "".join(f"<td{cls(n)}>{e(c)}</td>" for c, n in zip(row, numeric))
        out.append(f"<tr{klass}>{tds}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_value_text(v) for v in value)
    return MISSING if value is None else str(value)


def facts_table(rows: dict[str, Any] | Sequence[tuple[str, Any]], title: str | None = None) -> str:
    """A two-column (name, value) HTML table: the `_repr_html_` of a prepared task, loading
    costs, an inline run. Floats as in the report (`fmt`)."""
    items = rows.items() if isinstance(rows, dict) else rows
    e = html.escape
    body = "".join(
        f"<tr><th style='text-align:left'>{e(str(k))}</th><td>{e(_value_text(v))}</td></tr>"
        for k, v in items
    )
    caption = f"<caption style='text-align:left'><b>{e(title)}</b></caption>" if title else ""
    return f"<table>{caption}{body}</table>"


def _facts_html(facts: Sequence[tuple[str, str]]) -> str:
    e = html.escape
    items = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in facts)
    return f'<ul class="facts">{items}</ul>'


def render_html(
    manifest: dict,
    rows: Sequence[dict],
    transfer: tuple[list[str], list[dict]],
    env: dict | None,
    images: dict[str, bytes],
) -> str:
    """The report as one self-contained page; `images` (file name -> PNG bytes) are embedded."""
    e = html.escape
    title, facts = _title(manifest)
    cols = columns(_units(rows))
    classes = [str(row.get("status") or "") for row in rows]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        _facts_html(facts),
        "<h2>Cases</h2>",
        _html_table(
            [c.header for c in cols], _cells(rows, cols), [c.numeric for c in cols], classes
        ),
        f'<p class="legend">{e(_legend(rows))}</p>',
    ]
    names, transfer_rows = transfer
    if transfer_rows:
        headers, cells = _transfer_cells(names, transfer_rows, _units(rows))
        parts += [
            "<h2>Transfer learning</h2>",
            _html_table(headers, cells, [False] + [True] * (len(headers) - 1)),
            f'<p class="legend">{e(_TRANSFER_LEGEND)}</p>',
        ]
    parts.append("<h2>Plots</h2>")
    for name, data in images.items():
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(f'<div><img alt="{e(name)}" src="data:image/png;base64,{encoded}"></div>')
    parts += ["<h2>Environment</h2>", _facts_html(_environment_facts(env)), "</body></html>"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# plots


def _figure(width: float, height: float):
    """A figure on its own Agg canvas: no pyplot, no global backend switch, nothing leaks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _label(text: str) -> str:
    """A string drawn as is (a `$` would start mathtext)."""
    return str(text).replace("$", r"\$")


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_accuracy_vs_throughput(rows: Sequence[dict], path: Path) -> Path:
    """RMSE against training throughput (log x), one labelled point per ok case, with the
    noise floor(s) as horizontal lines."""
    points = [
        r
        for r in rows
        if r.get("status") == "ok"
        and r.get("rmse") is not None
        and (r.get("train_samples_per_s") or 0) > 0
    ]
    units = _units(rows)
    fig = _figure(7.5, 5)
    ax = fig.add_subplot()
    if not points:
        _empty(ax, "no ok case with an RMSE and a training throughput")
    else:
        for row, colour in zip(points, _colours(len(points))):
            ax.scatter(row["train_samples_per_s"], row["rmse"], color=colour, s=40, zorder=3)
            ax.annotate(
                _label(row["case"]),
                (row["train_samples_per_s"], row["rmse"]),
                xytext=(5, 4),
                textcoords="offset points",
                fontsize=8,
            )
        ax.set_xscale("log")
        floors = sorted(
            {round(r["noise_floor_rmse"], 6) for r in rows if r.get("noise_floor_rmse")}
        )
        for floor in floors:
            ax.axhline(floor, color="#888", linestyle="--", linewidth=1, zorder=1)
            ax.annotate(
                f"noise floor {fmt(floor)}{' ' + units if units else ''}",
                (0.01, floor),
                xycoords=("axes fraction", "data"),
                xytext=(0, 3),
                textcoords="offset points",
                fontsize=8,
                color="#555",
            )
        values = [r["rmse"] for r in points] + floors
        low, high = min(values), max(values)
        pad = 0.12 * (high - low) or 0.05 * high or 1.0
        ax.set_ylim(max(0.0, low - pad), high + pad)
        ax.margins(x=0.15)
        ax.set_xlabel("training throughput [samples/s]")
        ax.set_ylabel(f"RMSE [{units}]" if units else "RMSE")
        ax.grid(True, which="both", alpha=0.3)
    ax.set_title("Accuracy vs training throughput")
    fig.savefig(path, format="png")
    return path


def plot_loading_vs_compute(rows: Sequence[dict], path: Path) -> Path:
    """Fit time per case split into waiting for data (fit_s × stall_fraction) and the rest;
    hatched where the stall is estimated, grey where the split is unknown."""
    bars = [r for r in rows if r.get("status") == "ok" and (r.get("fit_s") or 0) > 0]
    fig = _figure(7.5, max(2.5, 1.5 + 0.45 * len(bars)))
    ax = fig.add_subplot()
    if not bars:
        _empty(ax, "no ok case with a fit time")
    else:
        labels, seen = [], set()
        for y, row in enumerate(bars):
            fit, wait = row["fit_s"], row.get("fit_wait_s")
            estimated = row.get("stall_method") == "estimated"
            label = row["case"] + (" (stall est.)" if estimated and wait is not None else "")
            labels.append(_label(label))
            if wait is None:
                kind = "fit (split unknown)"
                ax.barh(y, fit, color="#bbb", label=None if kind in seen else kind)
                seen.add(kind)
                continue
            wait = min(max(wait, 0.0), fit)
            kind = "waiting for data (estimated)" if estimated else "waiting for data"
            ax.barh(
                y,
                wait,
                color="#e07b39",
                hatch="//" if estimated else None,
                edgecolor="white" if estimated else None,
                label=None if kind in seen else kind,
            )
            seen.add(kind)
            ax.barh(
                y,
                fit - wait,
                left=wait,
                color="#3b75af",
                label=None if "compute" in seen else "compute",
            )
            seen.add("compute")
        ax.set_yticks(range(len(bars)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("fit time [s]")
        fig.legend(fontsize=8, loc="outside lower center", ncols=len(seen), frameon=False)
        ax.grid(True, axis="x", alpha=0.3)
    ax.set_title("Data loading vs compute during the fit")
    fig.savefig(path, format="png")
    return path


def _losses(epochs: Any, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, record in enumerate(epochs if isinstance(epochs, list) else []):
        value = _number(_get(record, key))
        if value is not None and value > 0:
            epoch = _get(record, "epoch")
            xs.append(epoch if isinstance(epoch, int) else i)
            ys.append(value)
    return xs, ys


def plot_loss_curves(results: Sequence[dict], path: Path) -> Path:
    """Train (solid) and validation (dashed) loss per epoch per ok case, log y; cases without
    epochs are left out."""
    curves = []
    for r in results:
        if r.get("status") != "ok":
            continue
        train, val = _losses(r.get("epochs"), "train_loss"), _losses(r.get("epochs"), "val_loss")
        if train[0] or val[0]:
            curves.append((str(r.get("case", "?")), train, val))
    fig = _figure(7.5, 5)
    ax = fig.add_subplot()
    if not curves:
        _empty(ax, "no case recorded losses per epoch")
    else:
        for (name, train, val), colour in zip(curves, _colours(len(curves))):
            if train[0]:
                ax.plot(*train, color=colour, marker="o", ms=3, label=_label(f"{name} train"))
            if val[0]:
                ax.plot(*val, color=colour, marker="o", ms=3, ls="--", label=_label(f"{name} val"))
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (normalised target)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, handlelength=3, ncols=2 if len(curves) > 4 else 1)
    ax.set_title("Loss per epoch")
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------------------------
# the report


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
    return manifest, results, env


class Png(bytes):
    """PNG bytes that Jupyter shows as an image."""

    def _repr_png_(self) -> bytes:
        return bytes(self)


class RunResults:
    """A results directory (`cubebench run`) in a notebook: the report's rows as a pandas
    DataFrame (`table()`), the report's tables as HTML (`_repr_html_`) and its plots
    (`plot(name)`, PNG). Everything comes from the functions `write_report` uses."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.manifest, self.results, self.environment = _load(self.run_dir)
        cases = self.manifest.get("cases")
        self.rows = results_table(self.results, cases if isinstance(cases, list) else None)
        self.transfer = transfer_table(self.results)

    @property
    def cases(self) -> list[str]:
        """Every case of the run: the manifest's list, then any other result file's case."""
        return [row["case"] for row in self.rows]

    def table(self, raw: bool = False):
        """One row per case (index: case). `raw=False`: the report's columns and headers with
        unrounded numbers; `raw=True`: every key of `results_table`'s rows."""
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        if not raw:
            cols = [c for c in columns(_units(self.rows)) if c.key in frame.columns]
            frame = frame[[c.key for c in cols]].set_axis([c.header for c in cols], axis=1)
        return frame.set_index(frame.columns[0])

    def transfer_frame(self):
        """RMSE per predictor and the transfer gain of the cases that evaluated several."""
        import pandas as pd

        names, rows = self.transfer
        data = [{"case": r["case"], **r["rmse"], "transfer_gain": r["transfer_gain"]} for r in rows]
        return pd.DataFrame(data, columns=["case", *names, "transfer_gain"]).set_index("case")

    def plot(self, name: str = ACCURACY_PNG) -> Png:
        """One of the report's plots (`PLOTS`), drawn afresh from the results."""
        import tempfile

        plotters: dict[str, Callable[[Path], Path]] = {
            ACCURACY_PNG: lambda p: plot_accuracy_vs_throughput(self.rows, p),
            LOADING_PNG: lambda p: plot_loading_vs_compute(self.rows, p),
            LOSS_PNG: lambda p: plot_loss_curves(self.results, p),
        }
        if name not in plotters:
            raise KeyError(f"unknown plot {name!r}; plots: {', '.join(plotters)}")
        with tempfile.TemporaryDirectory() as tmp:
            return Png(plotters[name](Path(tmp) / name).read_bytes())

    def _repr_html_(self) -> str:
        title, facts = _title(self.manifest)
        cols = columns(_units(self.rows))
        classes = [str(row.get("status") or "") for row in self.rows]
        parts = [
            f"<h3>{html.escape(title)}</h3>",
            _facts_html(facts),
            _html_table(
                [c.header for c in cols],
                _cells(self.rows, cols),
                [c.numeric for c in cols],
                classes,
            ),
            f"<p>{html.escape(_legend(self.rows))}</p>",
        ]
        names, transfer_rows = self.transfer
        if transfer_rows:
            headers, cells = _transfer_cells(names, transfer_rows, _units(self.rows))
            parts += [
                "<h4>Transfer learning</h4>",
                _html_table(headers, cells, [False] + [True] * (len(headers) - 1)),
                f"<p>{html.escape(_TRANSFER_LEGEND)}</p>",
            ]
        return "\n".join(parts)


def write_report(run_dir: Path) -> list[Path]:
    """Write report.md, report.html and the three plots into `run_dir`; return their paths.

    A directory that is not a readable cubebench run raises `CubebenchError` (one line)."""
    run_dir = Path(run_dir)
    manifest, results, env = _load(run_dir)
    cases = manifest.get("cases")
    rows = results_table(results, cases if isinstance(cases, list) else None)
    transfer = transfer_table(results)

    plotters: dict[str, Callable[[Path], Path]] = {
        ACCURACY_PNG: lambda p: plot_accuracy_vs_throughput(rows, p),
        LOADING_PNG: lambda p: plot_loading_vs_compute(rows, p),
        LOSS_PNG: lambda p: plot_loss_curves(results, p),
    }
    try:
        pngs = [plot(run_dir / name) for name, plot in plotters.items()]
        md = run_dir / REPORT_MD
        md.write_text(render_markdown(manifest, rows, transfer, env, PLOTS), encoding="utf-8")
        images = {p.name: p.read_bytes() for p in pngs}
        page = run_dir / REPORT_HTML
        page.write_text(render_html(manifest, rows, transfer, env, images), encoding="utf-8")
    except OSError as error:
        raise CubebenchError(
            f"cannot write the report into {run_dir}: {one_line(error, 200)}"
        ) from None
    return [md, page, *pngs]
