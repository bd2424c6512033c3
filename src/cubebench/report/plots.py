"""The report's plots, drawn from the aggregate rows (`tables.aggregate_table`).

matplotlib is imported inside the functions and draws on an Agg canvas of its own, so
importing the report is cheap and the caller's pyplot state and backend are left alone.
Points are told apart by a legend outside the axes (colour and marker per case), never by
annotations, which overlap as soon as two cases are close.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cubebench.display import fmt, number
from cubebench.report.tables import get, sample_unit

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
MAX_FLOOR_LINES = 3  # more distinct noise floors than this: one band from the lowest to the top


def _figure(width: float, height: float):
    """A figure on its own Agg canvas: no pyplot, no global backend switch, nothing leaks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _label(text: Any) -> str:
    """A string drawn as is (a `$` would start mathtext)."""
    return str(text).replace("$", r"\$")


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def _styles(n: int) -> list[tuple[Any, str]]:
    """(colour, marker) per series, distinct for up to 10 × len(MARKERS) series."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [(cmap(i % 10), MARKERS[(i // 10 + i) % len(MARKERS)]) for i in range(n)]


def _units(rows: Sequence[dict]) -> str | None:
    units = {row["units"] for row in rows if row.get("units")}
    return units.pop() if len(units) == 1 else None


def _accuracy_points(rows: Sequence[dict]) -> list[dict]:
    return [
        r
        for r in rows
        if r.get("n_ok") and r.get("rmse") is not None and (r.get("train_samples_per_s") or 0) > 0
    ]


def _floors(rows: Sequence[dict]) -> list[float]:
    """The distinct noise floors of the rows, to the 3 digits a label shows."""
    return sorted({float(f"{f:.3g}") for r in rows if (f := number(r.get("noise_floor_rmse")))})


def _draw_accuracy(ax, rows: Sequence[dict], unit: str) -> None:
    points = _accuracy_points(rows)
    units = _units(rows)
    if not points:
        _empty(ax, "no ok case with an RMSE and a training throughput")
        return
    ys: list[float] = []
    for row, (colour, marker) in zip(points, _styles(len(points))):
        x, y = row["train_samples_per_s"], row["rmse"]
        x_half, y_half = row.get("train_samples_per_s_half_width"), row.get("rmse_half_width")
        # log x: a lower error bar reaching 0 would vanish; keep it inside the positive axis
        xerr = None if x_half is None else [[min(x_half, 0.95 * x)], [x_half]]
        n = row.get("n_ok") or 0
        label = f"{row['case']} (n={n})" if n > 1 else row["case"]
        ax.errorbar(
            x,
            y,
            xerr=xerr,
            yerr=y_half,
            fmt=marker,
            color=colour,
            markersize=7,
            capsize=3,
            elinewidth=1,
            zorder=3,
            label=_label(label),
        )
        ys += [y - (y_half or 0), y + (y_half or 0)]
    ax.set_xscale("log")
    floors = _floors(rows)
    suffix = f" {units}" if units else ""
    if len(floors) > MAX_FLOOR_LINES:
        ax.axhspan(floors[0], floors[-1], color="#888", alpha=0.15, zorder=1)
        ax.axhline(floors[0], color="#888", linestyle="--", linewidth=1, zorder=1)
        ax.plot(
            [],
            [],
            color="#888",
            ls="--",
            label=f"noise floors {fmt(floors[0])}–{fmt(floors[-1])}{suffix}",
        )
    else:
        for i, floor in enumerate(floors):
            ax.axhline(floor, color="#888", linestyle="--", linewidth=1, zorder=1)
            ax.annotate(
                f"noise floor {fmt(floor)}{suffix}",
                (0.01, floor),
                xycoords=("axes fraction", "data"),
                xytext=(0, 3 + 9 * (i % 2)),
                textcoords="offset points",
                fontsize=8,
                color="#555",
            )
    values = ys + floors
    low, high = min(values), max(values)
    pad = 0.12 * (high - low) or 0.05 * high or 1.0
    ax.set_ylim(max(0.0, low - pad), high + pad)
    ax.margins(x=0.15)
    ax.set_xlabel(f"training throughput [{unit}s/s]")
    ax.set_ylabel(f"RMSE [{units}]" if units else "RMSE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        fontsize=8,
        frameon=False,
        title="case",
        title_fontsize=8,
    )


def plot_accuracy_vs_throughput(rows: Sequence[dict], path: Path) -> Path:
    """RMSE against training throughput (log x), one point per ok case with its 95 % interval
    on both axes where it has repeats, the noise floor(s) as horizontal lines.

    Rows of several tasks get one panel each: a pixel and a window are not the same sample,
    so two tasks never share a throughput axis."""
    tasks = list(dict.fromkeys(r.get("task") for r in rows if r.get("task") is not None)) or [None]
    fig = _figure(8.5, 1.0 + 4.2 * len(tasks))
    axes = fig.subplots(len(tasks), 1, squeeze=False)[:, 0]
    for ax, task in zip(axes, tasks):
        in_task = [r for r in rows if task is None or r.get("task") == task]
        _draw_accuracy(ax, in_task, sample_unit(task))
        title = "Accuracy vs training throughput"
        ax.set_title(f"{title}: {_label(task)}" if task else title, fontsize=10)
    fig.savefig(path, format="png")
    return path


def plot_loading_vs_compute(rows: Sequence[dict], path: Path) -> Path:
    """Fit time per ok case (mean over repeats), and the stall: drawn from the fit's end
    backwards (orange) when positive, past the fit's end (hatched) when negative, never
    clamped, with its 95 % interval as an error bar; a diamond marks the measured wait inside
    next(batch), from the fit's end too. Grey where the split is unknown."""
    bars = [r for r in rows if r.get("n_ok") and (r.get("fit_s") or 0) > 0]
    fig = _figure(8.5, max(2.5, 1.8 + 0.45 * len(bars)))
    ax = fig.add_subplot()
    if not bars:
        _empty(ax, "no ok case with a fit time")
        ax.set_title("Data loading vs compute during the fit")
        fig.savefig(path, format="png")
        return path
    seen: set[str] = set()

    def once(kind: str) -> str | None:
        if kind in seen:
            return None
        seen.add(kind)
        return kind

    labels = []
    for y, row in enumerate(bars):
        fit, stall = row["fit_s"], row.get("fit_wait_s")
        estimated = row.get("stall_method") == "estimated"
        labels.append(_label(row["case"] + (" (stall est.)" if estimated else "")))
        if stall is None:
            ax.barh(y, fit, color="#bbb", label=once("fit (split unknown)"))
        else:
            compute_end = min(fit, fit - stall)
            ax.barh(y, compute_end, color="#3b75af", label=once("compute"))
            if stall >= 0:
                kind = "stall (estimated)" if estimated else "stall"
                ax.barh(
                    y,
                    stall,
                    left=fit - stall,
                    color="#e07b39",
                    hatch="//" if estimated else None,
                    edgecolor="white" if estimated else None,
                    label=once(kind),
                )
            else:  # the loop beat the resident steps: shown past the fit's end
                ax.barh(
                    y,
                    -stall,
                    left=fit,
                    color="none",
                    edgecolor="#e07b39",
                    hatch="xx",
                    label=once("negative stall (past the fit's end)"),
                )
            half = row.get("fit_wait_s_half_width")
            if half is not None:
                ax.errorbar(
                    fit - stall,
                    y,
                    xerr=half,
                    fmt="none",
                    ecolor="black",
                    capsize=4,
                    elinewidth=1.2,
                    label=once("stall, 95 % interval"),
                )
        wait = row.get("fit_measured_wait_s")
        if wait is not None:
            ax.plot(
                fit - wait,
                y,
                marker="D",
                ms=5,
                color="#222",
                ls="none",
                label=once("measured wait in next(batch)"),
            )
    ax.axvline(0, color="#555", linewidth=0.8)
    ax.set_yticks(range(len(bars)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("fit time [s] (mean over the ok repeats)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(
        loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False
    )
    ax.set_title("Data loading vs compute during the fit")
    fig.savefig(path, format="png")
    return path


def _losses(epochs: Any, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, record in enumerate(epochs if isinstance(epochs, list) else []):
        value = number(get(record, key))
        if value is not None and value > 0:
            epoch = get(record, "epoch")
            xs.append(epoch if isinstance(epoch, int) else i)
            ys.append(value)
    return xs, ys


def plot_loss_curves(results: Sequence[dict], path: Path) -> Path:
    """Train (solid) and validation (dashed) loss per epoch, log y, of each case's first ok
    repeat; cases without epochs are left out."""
    curves, seen = [], set()
    for r in sorted(results, key=lambda r: r.get("repeat") or 0):
        case = str(r.get("case", "?"))
        if r.get("status") != "ok" or case in seen:
            continue
        train, val = _losses(r.get("epochs"), "train_loss"), _losses(r.get("epochs"), "val_loss")
        if train[0] or val[0]:
            seen.add(case)
            curves.append((case, train, val))
    order = {str(r.get("case", "?")): i for i, r in enumerate(results)}
    curves.sort(key=lambda c: order[c[0]])
    fig = _figure(8.5, 5)
    ax = fig.add_subplot()
    if not curves:
        _empty(ax, "no case recorded losses per epoch")
    else:
        for (name, train, val), (colour, marker) in zip(curves, _styles(len(curves))):
            if train[0]:
                ax.plot(*train, color=colour, marker=marker, ms=3, label=_label(f"{name} train"))
            if val[0]:
                ax.plot(
                    *val, color=colour, marker=marker, ms=3, ls="--", label=_label(f"{name} val")
                )
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (normalised target)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0,
            fontsize=7,
            handlelength=3,
            frameon=False,
        )
    ax.set_title("Loss per epoch (first ok repeat of each case)")
    fig.savefig(path, format="png")
    return path
