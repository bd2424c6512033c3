"""What the notebooks (`notebooks/`) use: a case run in this process, and plots of the cube, the
split and the predictions.

`run_case_inline` runs a case through the suite's one measurement path
(`cubebench.measure.run_case`, which the worker of `cubebench run` calls too): open the cube,
prepare the case's task, `setup()`, `fit()`, evaluate every predictor on its eval part and
build the result record — here in the calling process, so that the trained case, its context
and task stay at hand. The suite's numbers come from isolated workers with pinned thread
counts (`cubebench run`); an inline run is for looking at a case, not for timing it against
others.

No framework is imported here: the case imports its own in `setup()`. matplotlib is imported
inside the plotting functions, which return a closed figure (Jupyter shows a returned figure
once; a script can `fig.savefig`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cubebench.case import Case, Context, EpochRecord
from cubebench.display import facts_table as html_table
from cubebench.loading.stream import LoadStats

if TYPE_CHECKING:
    import pandas as pd
    import xarray as xr

    from cubebench.task import PreparedTask

PART_COLOURS = {  # parts of a split on a map; blocks of no part stay white
    "train": "#1f77b4",
    "val": "#ff7f0e",
    "test": "#2ca02c",
    "target_train": "#9467bd",
    "target_val": "#e377c2",
    "target_test": "#d62728",
}


# --- a case in this process ------------------------------------------------------------------


def case_class(case: str | Path | type[Case]) -> type[Case]:
    """A case class from its name (`cubebench list`), its file, or the class itself."""
    from cubebench.discovery import discover, load_case_class

    if isinstance(case, type):
        return case
    if isinstance(case, Path) or str(case).endswith(".py"):
        return load_case_class(Path(case))
    available = discover()
    if case not in available:
        raise KeyError(f"unknown case {case!r}; known: {', '.join(available)}")
    return available[case][1]


@dataclass
class InlineRun:
    """A case trained in this process: the case (its model), its context and task, and the
    result record the suite's worker would have written."""

    case: Case
    context: Context
    task: PreparedTask
    record: dict
    evaluated_samples: int = 0  # samples of the eval part scored (pixels, or windows)
    tensorboard_dir: str | None = None

    @property
    def name(self) -> str:
        return self.case.name

    @property
    def metrics(self) -> dict:
        return self.record["metrics"]

    @property
    def timing(self) -> dict:
        return self.record["timing"]

    @property
    def device(self) -> str:
        return self.record["device"]

    @property
    def loading(self) -> LoadStats:
        """The summed loading costs of the training streams (counters, not the stall)."""
        return self.context.loading()

    def epochs(self) -> pd.DataFrame:
        """One row per logged epoch (losses in normalised units)."""
        import pandas as pd

        from cubebench.measure import epoch_rows

        rows = epoch_rows(self.context)
        return pd.DataFrame(rows, columns=None if rows else ["epoch", "train_loss", "val_loss"])

    def result(self, run_id: str = "inline") -> dict:
        """The run as a result record of the suite's format (`results/<run>/<case>.json`)."""
        return {**self.record, "run_id": run_id}

    def _repr_html_(self) -> str:
        m = self.metrics
        units = m.get("units") or ""
        rows = [
            ("case", f"{self.name} ({type(self.case).library}) on {self.device}"),
            ("evaluated on", f"{m.get('eval_part')}: {self.evaluated_samples:,} samples"),
            (f"RMSE [{units}]", m.get("rmse")),
            ("RMSE / noise floor", m.get("rmse_over_noise_floor")),
            (f"MAE [{units}]", m.get("mae")),
            ("R²", m.get("r2")),
            (f"bias [{units}]", m.get("bias")),
        ]
        by_predictor = m.get("by_predictor") or {}
        if len(by_predictor) > 1:
            rows += [(f"RMSE {k} [{units}]", v.get("rmse")) for k, v in by_predictor.items()]
        rows += [(k, v) for k, v in m.items() if k == "transfer_gain"]
        rows += [(k.replace("_s", " s"), v) for k, v in self.timing.items() if v is not None]
        return html_table(rows, f"inline run of {self.name}")


class _EpochBar:
    """A rich progress bar over epochs (a widget in Jupyter with ipywidgets, else a terminal
    bar); without rich's Jupyter support one plain line per epoch."""

    def __init__(self, name: str, enabled: bool):
        self.name, self.enabled = name, enabled
        self.progress = None
        self.task_id = None

    def __enter__(self) -> _EpochBar:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console()
        if console.is_jupyter and not _has_ipywidgets():
            return self  # plain lines (see __call__)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epochs"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[loss]}"),
            console=console,
        )
        self.progress.start()
        self.task_id = self.progress.add_task(self.name, total=None, loss="")
        return self

    def __call__(self, record: EpochRecord, of: int) -> None:
        loss = "" if record.train_loss is None else f"train loss {record.train_loss:.4g}"
        if record.val_loss is not None:
            loss += f"  val loss {record.val_loss:.4g}"
        if self.progress is not None:
            self.progress.update(
                self.task_id, total=of or None, completed=record.epoch + 1, loss=loss
            )
        elif self.enabled:
            print(f"{self.name}: epoch {record.epoch + 1}/{of or '?'}  {loss}", flush=True)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


def _has_ipywidgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def run_case_inline(
    case: str | Path | type[Case],
    cube: str | xr.Dataset,
    params: dict[str, Any] | None = None,
    *,
    device: str = "cpu",
    seed: int = 0,
    threads: int = 2,
    tensorboard_dir: str | Path | None = None,
    progress: bool = True,
    task: PreparedTask | None = None,
    storage_options: dict | None = None,
) -> InlineRun:
    """Train and evaluate one case in this process, through the suite's measurement path.

    `case`: a name (`cubebench list`), a case file or a class; `cube`: a spec for
    `open_cube` or an opened dataset; `params` override the case's defaults (`epochs`...);
    `task`: an already prepared task of the case's task name (saves preparing it again).
    Seeds are set as in the worker; thread counts of the numeric libraries are not (the
    worker fixes them before the process starts), the case's own `threads` are. A case that
    fails raises here (a notebook wants the traceback), with the result's one-line reason.
    """
    from cubebench import results
    from cubebench.measure import run_case

    cls = case_class(case)
    with _EpochBar(cls.name, progress) as bar:
        measured = run_case(
            cls,
            cube,
            run_id="inline",
            params=params,
            device=device,
            seed=seed,
            threads=threads,
            environment=results.environment_manifest(threads, seed),
            task=task,
            storage_options=storage_options,
            tensorboard_dir=None if tensorboard_dir is None else str(tensorboard_dir),
            on_epoch=bar,
        )
    record = measured.result
    if record["status"] != "ok" or measured.case is None or measured.context is None:
        raise RuntimeError(f"{cls.name} failed: {record['reason']}")
    assert measured.task is not None
    return InlineRun(
        case=measured.case,
        context=measured.context,
        task=measured.task,
        record=record,
        evaluated_samples=measured.evaluation.samples if measured.evaluation else 0,
        tensorboard_dir=None if tensorboard_dir is None else str(tensorboard_dir),
    )


def log_to_mlflow(
    run: InlineRun, results_root: str | Path, experiment: str = "cubebench-notebooks"
) -> str:
    """Log an inline run into the sqlite mlflow store of `results_root` (or
    `MLFLOW_TRACKING_URI`) as the suite logs a case (`cubebench.tracking.Store`): params,
    metrics, per-epoch curves, the result file and the TensorBoard event files. Returns the
    mlflow run id; `mlflow ui --backend-store-uri sqlite:///<results_root>/mlflow.db` shows it."""
    from cubebench import results
    from cubebench.tracking import TAG_CASE, TAG_COMPLETE, TAG_ROLE, TAG_RUN_ID, Store

    root = Path(results_root)
    run_id = f"inline-{time.strftime('%Y%m%d-%H%M%S')}-{run.name}"
    run_dir = root / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run.result(run_id)
    results.validate(result)
    results.write_json_atomic(run_dir / f"{run.name}.json", result)
    if run.tensorboard_dir and Path(run.tensorboard_dir).is_dir():
        shutil.copytree(run.tensorboard_dir, run_dir / "tb" / run.name, dirs_exist_ok=True)
    store = Store.open(root, experiment)
    tags = {
        "mlflow.runName": run.name,
        TAG_RUN_ID: run_id,
        TAG_CASE: run.name,
        TAG_ROLE: "case",
        TAG_COMPLETE: "false",
    }
    mlflow_run = store.client.create_run(store.experiment_id, tags=tags).info.run_id
    store.finish_case(mlflow_run, run_dir, result)
    return mlflow_run


# --- predictions -----------------------------------------------------------------------------


def predictions(run: InlineRun, part: str | None = None, predictor: str | None = None):
    """Every sample of a part (default: the case's eval part) with its prediction, in physical
    units, as a pandas DataFrame with columns time, lat, lon, y_true, y_pred, residual
    (prediction − truth).

    The features are the loader's (the normalised float32 records a stream decodes, in chunk
    order) and go through the case's predictor as in `cubebench.measure.evaluate`; the result
    is denormalised with the train-only target mean and std."""
    import pandas as pd

    task, context = run.task, run.context
    part = part or type(run.case).eval_part
    predictors = run.case.predictors()
    predict = predictors[predictor or next(iter(predictors))]
    if task.spec.patch is not None:
        raise ValueError(
            f"predictions() maps pixel samples back to the grid; task {task.spec.name!r} "
            "samples windows"
        )
    stream = context.stream(part, shuffle=False)
    mean, std = task.target_mean, task.target_std
    sel = task.selections[part]
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("it", "iy", "ix", "y", "p")}
    for chunk in stream.chunks:
        decoded = stream.decode(chunk)  # no epoch: C order of the chunk, no shuffle
        window = stream.chunk_slices(chunk)
        arrays = stream.reader.read_many(stream.variables, window)
        valid = (
            sel.time[window[0], None, None]
            & sel.lat[None, window[1], None]
            & sel.lon[None, None, window[2]]
        )
        for a in arrays:
            valid &= np.isfinite(a)
        part_mask = task.part_mask(part, window)  # a chunk the parts share
        if part_mask is not None:
            valid &= part_mask
        it, iy, ix = np.nonzero(valid)
        if len(it) != len(decoded.y):  # the reference definition and the loader disagree
            raise RuntimeError(f"chunk {chunk}: {len(it)} valid pixels, {len(decoded.y)} samples")
        columns["it"].append(it + window[0].start)
        columns["iy"].append(iy + window[1].start)
        columns["ix"].append(ix + window[2].start)
        columns["y"].append(decoded.y.astype(np.float64) * std + mean)
        y_hat = np.asarray(predict(decoded.x), np.float64).reshape(-1) if len(decoded.y) else []
        columns["p"].append(np.asarray(y_hat, np.float64) * std + mean)
    cat = {k: np.concatenate(v) if v else np.empty(0) for k, v in columns.items()}
    cube = task.cube
    frame = pd.DataFrame(
        {
            "time": cube["time"].values[cat["it"].astype(int)],
            "lat": task.coords.lat[cat["iy"].astype(int)],
            "lon": task.coords.lon[cat["ix"].astype(int)],
            "y_true": cat["y"],
            "y_pred": cat["p"],
        }
    )
    frame["residual"] = frame["y_pred"] - frame["y_true"]
    frame.attrs.update(part=part, units=task.target_units, case=run.name)
    return frame


def residual_map(run: InlineRun, part: str | None = None, frame=None) -> xr.DataArray:
    """The mean residual (prediction − truth) per pixel over a part (default: the eval part),
    as a lat × lon DataArray on the cube's grid (NaN where the part has no sample)."""
    import xarray as xr

    frame = predictions(run, part) if frame is None else frame
    task = run.task
    lat, lon = task.coords.lat, task.coords.lon
    iy = np.searchsorted(-lat, -frame["lat"].to_numpy()) if lat[0] > lat[-1] else None
    iy = np.searchsorted(lat, frame["lat"].to_numpy()) if iy is None else iy
    ix = np.searchsorted(lon, frame["lon"].to_numpy())
    flat = iy * len(lon) + ix
    total = np.bincount(flat, frame["residual"].to_numpy(), minlength=len(lat) * len(lon))
    count = np.bincount(flat, minlength=len(lat) * len(lon))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    units = task.target_units
    return xr.DataArray(
        mean.reshape(len(lat), len(lon)),
        coords={"lat": lat, "lon": lon},
        dims=("lat", "lon"),
        name="residual",
        attrs={
            "long_name": f"mean residual (prediction − truth), {frame.attrs.get('part', part)}",
            "units": units,
            "case": run.name,
        },
    )


# --- plots -----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def _done(fig):
    """Close the figure in pyplot (no second copy from the inline backend) and return it."""
    _pyplot().close(fig)
    return fig


def plot_cube(
    ds: xr.Dataset,
    var: str = "land_surface_temperature",
    time: int | None = None,
    lat: float | None = None,
    lon: float | None = None,
):
    """A map of `var` at one time step (index `time`, default the middle) and its time series
    at one pixel (default: the pixel with the most valid values in that map's column)."""
    plt = _pyplot()
    da = ds[var]
    t = da.sizes["time"] // 2 if time is None else time
    frame = da.isel(time=t).load()
    if lat is None or lon is None:
        finite = np.isfinite(frame.values)
        if finite.any():  # the valid pixel closest to mid-latitudes of the north
            cells = np.argwhere(finite)
            iy, ix = cells[np.argmin(np.abs(cells[:, 0] - finite.shape[0] // 4))]
            lat, lon = float(frame.lat[iy]), float(frame.lon[ix])
        else:
            lat, lon = float(frame.lat[frame.sizes["lat"] // 2]), float(frame.lon[0])
    series = da.sel(lat=lat, lon=lon, method="nearest").load()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4), width_ratios=(1.6, 1))
    frame.plot(ax=left, cmap="RdYlBu_r", cbar_kwargs={"shrink": 0.8})
    left.plot([lon], [lat], marker="x", color="k", ms=8)
    left.set_title(f"{var} at {str(frame.time.values)[:10]}")
    right.plot(series.time.values, series.values, marker=".", lw=0.8)
    units = da.attrs.get("units", "")
    right.set_ylabel(f"{var} [{units}]" if units else var)
    right.set_title(f"at lat {float(series.lat):.2f}, lon {float(series.lon):.2f}")
    right.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return _done(fig)


def split_map(task: PreparedTask) -> np.ndarray:
    """(time blocks, lat, lon) array of part indices per pixel (index into `task.blocks`'s
    parts; -1 where a block belongs to no part or was left out by the buffer)."""
    codes = task.part_of_block[:, task.grid.index(1)][:, :, task.grid.index(2)]
    return np.where(codes >= 0, codes, -1).astype(np.int8)


def plot_split(task: PreparedTask, max_panels: int = 6):
    """Which blocks are train / val / test (and the target parts of a transfer task): one map
    per block of time steps (up to `max_panels`)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = _pyplot()
    codes = split_map(task)
    parts = list(task.blocks)
    colours = ["#ffffff", *[PART_COLOURS.get(p, "#7f7f7f") for p in parts]]
    cmap = ListedColormap(colours)
    nt = min(codes.shape[0], max_panels)
    cols = min(nt, 3)
    rows = -(-nt // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 2.6 * rows + 0.6), squeeze=False)
    lat, lon = task.coords.lat, task.coords.lon
    dlat = abs(float(lat[1] - lat[0])) if len(lat) > 1 else 1.0
    dlon = abs(float(lon[1] - lon[0])) if len(lon) > 1 else 1.0
    extent = (lon[0] - dlon / 2, lon[-1] + dlon / 2, lat[-1] - dlat / 2, lat[0] + dlat / 2)
    origin = "upper" if lat[0] > lat[-1] else "lower"
    if origin == "lower":
        extent = (extent[0], extent[1], lat[0] - dlat / 2, lat[-1] + dlat / 2)
    times = task.cube["time"].values
    edges = task.block_edges
    for k, ax in enumerate(axes.flat):
        if k >= nt:
            ax.axis("off")
            continue
        ax.imshow(
            codes[k] + 1,
            cmap=cmap,
            vmin=0,
            vmax=len(colours) - 1,
            extent=extent,
            origin=origin,
            interpolation="nearest",
            aspect="auto",
        )
        for e in edges[2][1:-1]:  # block boundaries
            ax.axvline(lon[0] - dlon / 2 + e * dlon, color="k", lw=0.4)
        for e in edges[1][1:-1]:
            y = lat[0] - dlat / 2 + e * dlat if origin == "lower" else lat[0] + dlat / 2 - e * dlat
            ax.axhline(y, color="k", lw=0.4)
        t0, t1 = int(edges[0][k]), int(edges[0][k + 1]) - 1
        ax.set_title(f"time {str(times[t0])[:10]} … {str(times[t1])[:10]}", fontsize=9)
        ax.set_xlabel("lon")
        ax.set_ylabel("lat")
    handles = [
        Patch(color=PART_COLOURS.get(p, "#7f7f7f"), label=f"{p} ({len(task.blocks[p])})")
        for p in parts
    ]
    handles.append(Patch(facecolor="white", edgecolor="k", label="no samples / left out"))
    fig.legend(handles=handles, loc="lower center", ncols=len(handles), fontsize=8)
    shown = f"{nt} of {codes.shape[0]}" if nt < codes.shape[0] else f"{nt}"
    fig.suptitle(
        f"{task.spec.split} split of {task.spec.name} ({shown} time blocks; a block = "
        f"{'×'.join(map(str, task.block_shape))} cells at most)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _done(fig)


def plot_predictions(run: InlineRun, frame=None, max_points: int = 20000):
    """Predicted vs true on the eval part (a seeded subsample of `max_points` points) and the
    residual histogram."""
    plt = _pyplot()
    frame = predictions(run) if frame is None else frame
    units = frame.attrs.get("units", "")
    shown = frame.sample(min(len(frame), max_points), random_state=0) if len(frame) else frame
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), width_ratios=(1, 1))
    left.scatter(shown["y_true"], shown["y_pred"], s=2, alpha=0.3)
    if len(frame):
        lo = float(min(frame["y_true"].min(), frame["y_pred"].min()))
        hi = float(max(frame["y_true"].max(), frame["y_pred"].max()))
        left.plot([lo, hi], [lo, hi], color="k", lw=0.8, label="prediction = truth")
        left.legend(loc="upper left")
    left.set_xlabel(f"true [{units}]")
    left.set_ylabel(f"predicted [{units}]")
    rmse = run.metrics.get("rmse")
    left.set_title(f"{run.name} on {frame.attrs.get('part')}: RMSE {rmse:.3g} {units}")
    right.hist(frame["residual"], bins=60, color="#555")
    floor = run.task.noise_floor
    if floor:
        for s in (-floor, floor):
            right.axvline(s, color="tab:red", lw=0.8, ls="--")
        right.text(floor, right.get_ylim()[1] * 0.9, " ± noise floor", color="tab:red")
    right.set_xlabel(f"residual: prediction − truth [{units}]")
    right.set_ylabel("samples")
    fig.tight_layout()
    return _done(fig)


def plot_residual_map(residuals: xr.DataArray):
    """A map of `residual_map(run)`, centred on zero."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    limit = float(np.nanmax(np.abs(residuals.values))) if np.isfinite(residuals).any() else 1.0
    residuals.plot(ax=ax, cmap="RdBu_r", vmin=-limit, vmax=limit, cbar_kwargs={"shrink": 0.8})
    ax.set_title(f"{residuals.attrs.get('case', '')}: {residuals.attrs.get('long_name', '')}")
    fig.tight_layout()
    return _done(fig)


def plot_loss(run_or_logdir: InlineRun | str | Path):
    """Loss per epoch read back from the TensorBoard event files (`cubebench.tensorboard`)."""
    from cubebench.tensorboard import read_scalars

    plt = _pyplot()
    logdir = (
        run_or_logdir.tensorboard_dir if isinstance(run_or_logdir, InlineRun) else run_or_logdir
    )
    scalars = read_scalars(logdir) if logdir else {}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for tag in ("loss/train", "loss/val"):
        if scalars.get(tag):
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, marker="o", label=tag)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no losses logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (normalised target)")
    ax.set_title("TensorBoard scalars")
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return _done(fig)


# --- loading ---------------------------------------------------------------------------------


def loader_costs(task: PreparedTask, part: str = "train", **options) -> pd.DataFrame:
    """`cubebench bench-loader` on a part (`cubebench.loading.bench.bench_loader`: the loader
    against raw decode in the same run), as a one-column table."""
    import pandas as pd

    from cubebench.loading.bench import bench_loader

    row = bench_loader(task, part, **options)
    return pd.DataFrame({"value": pd.Series(row, dtype=object)})
