"""A task prepared once and identically for every library.

`TaskSpec` says what to predict from what, where and when; `prepare_task` turns it into a
`PreparedTask` against a cube:

* the cube is cut into **blocks in the units of the science** (`cubebench.splits`: days ×
  degrees, periods of time, a source and a target box; or whole storage chunks), independent
  of the chunking but for the `chunks` kind, so every layout of a cube has the same parts;
* blocks get their parts (seeded ranking in the fractions, dates, boxes), and an optional
  buffer leaves out the blocks next to a later part's;
* normalisation statistics come from **train blocks only**, in one NaN-safe dask pass over the
  chunks that also counts the valid samples of every block and of every (chunk, part) pair (on
  a `distributed` cluster when one is given): a chunk may hold samples of several parts, and
  the loader reads it for each of them, masked to the part.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import dask
import numpy as np
import xarray as xr

from cubebench.cluster import dask_client
from cubebench.cube.fingerprint import cube_fingerprint
from cubebench.cube.integrity import raise_unreadable_chunk
from cubebench.cube.schema import require_variable
from cubebench.dates import date_fields, in_calendar, parse_time
from cubebench.errors import TaskError
from cubebench.splits import Grid, Split, buffer_out, grid_of, time_parts
from cubebench.windows import Patch, Windows, cell_counts, hidden_mask, n_cells, place_windows

COORD_FEATURES = ("lat", "lon", "sin_doy", "cos_doy")
PARTS = ("train", "val", "test")
TARGET_PARTS = ("target_train", "target_val", "target_test")


def _finite(value: object) -> bool:
    """A real number (not a bool) that is finite as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond the float range
        return False


def parse_time_range(text: str) -> tuple[str, str]:
    """`"START,END"` (inclusive dates, e.g. `2001-03-01,2001-08-31`) -> (start, end)."""
    start, sep, end = text.partition(",")
    if not sep:
        raise TaskError(f"a time range is 'START,END', got {text!r}")
    _check_time_range((start, end))
    return (start, end)


def _check_time_range(time_range: object) -> None:
    if not isinstance(time_range, tuple | list) or len(time_range) != 2:
        raise TaskError(f"a time range is a (start, end) pair, got {time_range!r}")
    start, end = (parse_time(v) for v in time_range)
    if date_fields(start) > date_fields(end):
        raise TaskError(f"empty time range {tuple(time_range)!r}: start is after end")


def parse_fractions(text: str) -> tuple[float, float, float]:
    """`"train,val,test"` split fractions, e.g. `0.7,0.15,0.15`."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise TaskError(f"split fractions are 'train,val,test', got {text!r}") from None
    _check_fractions(values)
    return values  # type: ignore[return-value]


def _check_fractions(f: object) -> None:
    ok = (
        isinstance(f, tuple | list)
        and len(f) == 3
        and all(_finite(v) for v in f)
        and min(f) >= 0
        and f[0] > 0
        and abs(sum(float(v) for v in f) - 1.0) <= 1e-6
    )
    if not ok:
        raise TaskError(
            f"split fractions must be 3 non-negative numbers summing to 1 (train > 0), got {f!r}"
        )


@dataclass(frozen=True)
class Box:
    """A latitude/longitude box in degrees.

    Longitudes compare modulo 360, so one box works on -180..180 and 0..360 (ERA5) cubes alike:
    `lon -10..40` selects 350..360 and 0..40 on a 0..360 grid, and `lon 160..200` (or
    `-200..-160`) is a box across the antimeridian. A box 360° or wider selects every longitude.
    """

    lat_min: float
    lat_max: float
    lon_min: float = -180.0
    lon_max: float = 180.0

    def __post_init__(self) -> None:
        values = (self.lat_min, self.lat_max, self.lon_min, self.lon_max)
        if not all(_finite(v) for v in values):
            raise TaskError(f"a box takes four finite numbers, got {values!r}")
        if self.lat_min >= self.lat_max or self.lon_min >= self.lon_max:
            raise TaskError(f"empty box {values!r}: minimum must be below maximum")

    @classmethod
    def parse(cls, text: str) -> Box:
        """`"lat_min,lat_max,lon_min,lon_max"` (or just the two latitudes)."""
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            values = []
        if len(values) not in (2, 4) or not all(math.isfinite(v) for v in values):
            raise TaskError(
                f"a box is 'lat_min,lat_max[,lon_min,lon_max]' in finite degrees, got {text!r}"
            )
        if values[0] >= values[1] or (len(values) == 4 and values[2] >= values[3]):
            raise TaskError(f"empty box {text!r}: minimum must be below maximum")
        return cls(*values)

    def lat_mask(self, lat: np.ndarray) -> np.ndarray:
        return (lat >= self.lat_min) & (lat <= self.lat_max)

    def lon_mask(self, lon: np.ndarray) -> np.ndarray:
        """Longitudes east of `lon_min` by at most the box's width, whatever their convention."""
        east = (np.asarray(lon, dtype=np.float64) - self.lon_min) % 360.0
        return east <= self.lon_max - self.lon_min

    def __str__(self) -> str:
        return f"lat {self.lat_min:g}..{self.lat_max:g}, lon {self.lon_min:g}..{self.lon_max:g}"


DEFAULT_SPLIT = Split()  # blocks of 46 days x 10 degrees


@dataclass(frozen=True)
class TaskSpec:
    """What to predict from what, where and when, and how to split it."""

    name: str = "lst-from-t2m"
    inputs: tuple[str, ...] = ("air_temperature_2m",)
    coord_features: tuple[str, ...] = ("lat", "sin_doy", "cos_doy")
    target: str = "land_surface_temperature"
    region: Box | None = None
    time_range: tuple[str, str] | None = None
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split: Split = DEFAULT_SPLIT  # or its text: "blocks:46d,10deg", "time:2016-12-31,2017-12-31"...
    source_box: Box | None = None  # region split: pretrain here ...
    target_box: Box | None = None  # ... and transfer to here
    patch: Patch | None = None  # sample geometry: pixels (None) or windows with gaps to fill
    seed: int = 0

    @property
    def features(self) -> tuple[str, ...]:
        return self.inputs + self.coord_features

    @property
    def geometry(self) -> str:
        return "pixel" if self.patch is None else "patch"

    @property
    def parts(self) -> tuple[str, ...]:
        return PARTS + TARGET_PARTS if self.split.kind == "region" else PARTS

    def __post_init__(self) -> None:
        # lists become tuples (hashable, and `features` concatenates them); then every field
        # is checked, so a bad spec fails where it is made, before any cube is opened
        for name in ("inputs", "coord_features", "fractions", "time_range"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.split, str):
            object.__setattr__(self, "split", Split.parse(self.split))
        self.validate()

    def validate(self) -> None:
        """Raise a TaskError (one line) unless every field has a usable value."""
        for field in ("name", "target"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise TaskError(f"{field} must be a non-empty string, got {value!r}")
        for field in ("inputs", "coord_features"):
            value = getattr(self, field)
            if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
                raise TaskError(f"{field} must be a tuple of variable names, got {value!r}")
        if not self.inputs:
            raise TaskError("a task needs at least one input variable")
        unknown = set(self.coord_features) - set(COORD_FEATURES)
        if unknown:
            raise TaskError(
                f"unknown coordinate feature(s) {sorted(unknown)}; known: {list(COORD_FEATURES)}"
            )
        _check_fractions(self.fractions)
        for field in ("region", "source_box", "target_box"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, Box):
                raise TaskError(f"{field} must be a Box or None, got {value!r}")
        if self.time_range is not None:
            _check_time_range(self.time_range)
        if not isinstance(self.split, Split):
            raise TaskError(f"split must be a Split or its text, got {self.split!r}")
        self.split.validate()
        if self.split.kind == "region" and (self.source_box is None or self.target_box is None):
            raise TaskError("region split needs both a source box and a target box")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TaskError(f"seed must be an integer, got {self.seed!r}")
        if self.patch is not None:
            if not isinstance(self.patch, Patch):
                raise TaskError(f"patch must be a Patch or None, got {self.patch!r}")
            self.patch.validate()
            if self.split.kind == "region":
                raise TaskError("the patch geometry has no region (transfer) split")


def builtin_tasks() -> dict[str, TaskSpec]:
    """The tasks shipped as files in `cubebench/tasks/` (`cubebench.taskfiles`)."""
    from cubebench.taskfiles import builtin_files, load_task

    return {name: load_task(name)[0] for name in sorted(builtin_files())}


def get_task(name: str, **overrides: object) -> TaskSpec:
    """A built-in task by name, or a task file by path, with `overrides` of its fields."""
    from cubebench.taskfiles import load_task

    spec, _ = load_task(name)
    return replace(spec, **{k: v for k, v in overrides.items() if v is not None})


def task_for(default: str, choice: dict | None = None, **overrides: object) -> TaskSpec:
    """The task a case runs: the run's choice (`--task` NAME|PATH, `--inputs`, `--target`:
    keys `task`, `toml` (the file's text), `inputs`, `target`) where given, else the case's
    own `default`; `overrides`: more fields (the split seed)."""
    choice = choice or {}
    inputs = choice.get("inputs")
    changes = {"inputs": tuple(inputs) if inputs else None, "target": choice.get("target")}
    changes = {k: v for k, v in {**changes, **overrides}.items() if v is not None}
    if choice.get("toml"):  # a run keeps its task file's text: resumed, it is the same task
        from cubebench.taskfiles import spec_from_toml

        return replace(spec_from_toml(choice["toml"], f"task file {choice.get('task')}"), **changes)
    return get_task(choice.get("task") or default, **changes)


def with_split(spec: TaskSpec, split: str | None = None, buffer: int | None = None) -> TaskSpec:
    """`spec` with the command line's `--split` and `--buffer`.

    A transfer (region) task keeps its source and target boxes: a `blocks` split gives it its
    grid, a `time` or `chunks` split leaves it as it is (its split is what the task is about).
    A `region` split on a task without boxes is a TaskError."""
    if split is None and buffer is None:
        return spec
    chosen = Split.parse(split) if split else spec.split
    if spec.split.kind == "region":
        if chosen.kind in ("blocks", "region"):
            grid = {"time_block": chosen.time_block, "space_block": chosen.space_block}
            chosen = replace(spec.split, **grid)
        else:
            chosen = spec.split
    elif chosen.kind == "region":
        raise TaskError(
            f"task {spec.name} has no source and target boxes for a region split; "
            "the transfer task has (lst-from-t2m-transfer)"
        )
    if buffer is not None:
        chosen = replace(chosen, buffer=buffer)
    return replace(spec, split=chosen)


# --- samples of one block: the reference definition every loader must reproduce ---------


@dataclass(frozen=True)
class Selection:
    """Which pixels of the cube the task may use, as three 1-D masks (time, lat, lon)."""

    time: np.ndarray
    lat: np.ndarray
    lon: np.ndarray


@dataclass(frozen=True)
class CoordArrays:
    """Per-axis values of the coordinate features."""

    lat: np.ndarray
    lon: np.ndarray
    season: np.ndarray  # angle of the annual cycle per time step


def season_of(time: xr.DataArray) -> np.ndarray:
    """2*pi*(day_of_year - 1)/days_in_year: works for any calendar (360_day included)."""
    doy = time.dt.dayofyear.values.astype(np.float64)
    days = time.dt.days_in_year.values.astype(np.float64)
    return 2.0 * np.pi * (doy - 1.0) / days


def valid_mask(
    inputs: Sequence[np.ndarray],
    target: np.ndarray,
    selection: Selection,
    origin: tuple[int, int, int],
) -> np.ndarray:
    """The block's valid pixels: in the selection, every input and the target finite."""
    valid = selection_mask(selection, origin, target.shape) & np.isfinite(target)
    for a in inputs:
        valid &= np.isfinite(a)
    return valid


def selection_mask(
    selection: Selection, origin: tuple[int, int, int], shape: tuple[int, ...]
) -> np.ndarray:
    """The selected pixels of the slab of `shape` starting at `origin`."""
    nt, ny, nx = shape
    t0, y0, x0 = origin
    return (
        selection.time[t0 : t0 + nt, None, None]
        & selection.lat[None, y0 : y0 + ny, None]
        & selection.lon[None, None, x0 : x0 + nx]
    )


def _samples_of(
    valid: np.ndarray,
    inputs: Sequence[np.ndarray],
    target: np.ndarray,
    coords: CoordArrays,
    coord_features: Sequence[str],
    origin: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray]:
    t0, y0, x0 = origin
    it, iy, ix = np.nonzero(valid)
    columns = [a[valid].astype(np.float64) for a in inputs]
    per_axis = {
        "lat": lambda: coords.lat[y0 + iy],
        "lon": lambda: coords.lon[x0 + ix],
        "sin_doy": lambda: np.sin(coords.season[t0 + it]),
        "cos_doy": lambda: np.cos(coords.season[t0 + it]),
    }
    columns += [per_axis[name]().astype(np.float64) for name in coord_features]
    x = np.stack(columns, axis=1) if columns else np.empty((valid.sum(), 0))
    return x, target[valid].astype(np.float64)


# --- moments: count, mean and M2, merged exactly across blocks (Chan et al.) --------------


@dataclass(frozen=True)
class Moments:
    n: int
    mean: np.ndarray
    m2: np.ndarray

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n) if self.n else np.full_like(self.mean, np.nan)


def _chunk_stats(
    inputs: list[np.ndarray],
    target: np.ndarray,
    coords: CoordArrays,
    selections: list[Selection],
    group_of_block: np.ndarray,
    runs: tuple[np.ndarray, np.ndarray, np.ndarray],
    coord_features: tuple[str, ...],
    origin: tuple[int, int, int],
    patch: Patch | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple | None]:
    """One chunk's valid samples grouped by block: the blocks' flat indices, their sample
    counts, means and M2 (the merge is Chan's, exact); for the patch geometry, the chunk's
    target pixels per cell.

    `runs` are the block (run) of each of the chunk's indices per axis, `group_of_block` the
    selection group of every block of the grid (-1: none): a pixel counts when it lies in its
    block's group's selection and every input and the target are finite."""
    rt, ry, rx = runs
    groups = group_of_block[np.ix_(rt, ry, rx)]
    selected = np.zeros(target.shape, bool)
    for g, selection in enumerate(selections):
        selected |= (groups == g) & selection_mask(selection, origin, target.shape)
    valid = selected & np.isfinite(target)
    for a in inputs:
        valid &= np.isfinite(a)
    x, y = _samples_of(valid, inputs, target, coords, coord_features, origin)
    it, iy, ix = np.nonzero(valid)
    flat = np.ravel_multi_index((rt[it], ry[iy], rx[ix]), group_of_block.shape)
    blocks, which = np.unique(flat, return_inverse=True)
    values = np.column_stack([x, y])
    n = np.bincount(which, minlength=len(blocks))
    columns = values.shape[1]
    sums = [np.bincount(which, v, len(blocks)) for v in values.T]
    mean = np.stack(sums, axis=1).reshape(len(blocks), columns) / np.maximum(n, 1)[:, None]
    squares = [
        np.bincount(which, (v - mean[which, j]) ** 2, len(blocks)) for j, v in enumerate(values.T)
    ]
    m2 = np.stack(squares, axis=1).reshape(len(blocks), columns)
    cells = None
    if patch is not None:
        ts, ys, xs = (slice(o, o + k) for o, k in zip(origin, target.shape))
        cells = cell_counts(valid & hidden_mask(patch, seed, ts, ys, xs), origin, patch.step)
    return blocks, n, mean, m2, cells


def merged(n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> Moments:
    """The moments of pieces (counts, means, M2 per piece) together: Chan's pairwise formula
    for many pieces at once."""
    total = int(n.sum())
    if total == 0:
        return Moments(0, np.zeros(mean.shape[1]), np.zeros(mean.shape[1]))
    grand = (n[:, None] * mean).sum(axis=0) / total
    spread = (m2 + n[:, None] * (mean - grand) ** 2).sum(axis=0)
    return Moments(total, grand, spread)


# --- the prepared task ----------------------------------------------------------------------


BUFFER = -2  # `part_of_block` of a block left out by the buffer (-1: in no part)


@dataclass
class PreparedTask:
    """A task bound to a cube: blocks per part, sample counts and train-only statistics."""

    spec: TaskSpec
    cube: xr.Dataset
    fingerprint: str
    chunk_shape: tuple[int, int, int]
    grid: Grid  # the split's blocks
    part_of_block: np.ndarray  # block grid -> index into spec.parts, -1 no part, BUFFER
    coords: CoordArrays
    selections: dict[str, Selection]  # per part
    blocks: dict[str, np.ndarray]  # part -> (k, 3) block indices, sorted
    samples: dict[str, int]  # part -> valid samples (windows, for the patch geometry)
    feature_mean: np.ndarray
    feature_std: np.ndarray
    target_mean: float
    target_std: float
    target_units: str
    noise_floor: float | None
    blocks_without_samples: int
    blocks_in_both_boxes: int = 0
    # part -> blocks and valid pixels the buffer left out
    buffered: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    windows: Windows | None = None  # patch geometry: the windows of every part
    # part -> {chunk index (time, lat, lon): the part's valid pixels in that chunk}, for every
    # chunk holding cells of the part (0 included); sums to the part's valid pixels
    chunk_samples: dict[str, dict[tuple[int, int, int], int]] = dataclasses.field(
        default_factory=dict
    )
    # part -> (chunks along time, lat, lon) array: the chunk's cells in the part's blocks and
    # selection, valid or not: what the part needs of the chunk (read amplification's base)
    chunk_cells: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def block_edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.grid.edges

    @property
    def block_grid(self) -> tuple[int, int, int]:
        return self.grid.shape

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return self.grid.block_shape()

    @functools.cached_property
    def chunk_edges(self) -> list[np.ndarray]:
        return [np.concatenate([[0], np.cumsum(c)]) for c in self.cube[self.spec.target].chunks]

    def block_slices(self, block: Sequence[int]) -> tuple[slice, slice, slice]:
        return _block_slices(self.block_edges, block)

    def chunk_slices(self, chunk: Sequence[int]) -> tuple[slice, slice, slice]:
        return _block_slices(self.chunk_edges, chunk)  # type: ignore[return-value]

    def part_chunks(self, part: str) -> list[tuple[int, int, int]]:
        """The chunks holding cells of the part, in C order: what its loader reads."""
        return [tuple(int(i) for i in c) for c in np.argwhere(self.chunk_cells[part] > 0)]

    def needed_cells(self, part: str) -> np.ndarray:
        """What the part needs of every chunk, in cells: the chunk's cells in the part's
        selection (box, time range; ocean and clouds included) times the part's share of the
        chunk's cells that lie in any part's blocks. A chunk of one part's blocks is needed
        whole; a chunk the parts share is needed in proportion (its cells in blocks of no
        part, like ocean-only blocks, are shared out the same way)."""
        cells = self.chunk_cells[part].astype(np.float64)
        total = sum(self.chunk_cells[p] for p in self.spec.parts).astype(np.float64)
        share = np.divide(cells, total, out=np.zeros_like(cells), where=total > 0)
        sel = self.selections[part]
        selected = [
            np.add.reduceat(mask.astype(np.int64), e[:-1].astype(np.intp))
            for mask, e in zip((sel.time, sel.lat, sel.lon), self.chunk_edges)
        ]
        return np.einsum("i,j,k->ijk", *selected) * share

    def part_mask(self, part: str, window: Sequence[slice]) -> np.ndarray | None:
        """Which pixels of `window` lie in the part's blocks; None when all do (a chunk inside
        the part's blocks: nothing to mask)."""
        code = self.spec.parts.index(part)
        # the blocks the window meets (a few), then expanded axis by axis: a 3-D fancy index
        # over every pixel cost 6x more, as much as decoding the chunk
        blocks = [
            np.unique(self.grid.index(a)[w], return_inverse=True) for a, w in enumerate(window)
        ]
        inside = self.part_of_block[np.ix_(*(ids for ids, _ in blocks))] == code
        if inside.all():
            return None
        (_, t), (_, y), (_, x) = blocks
        return inside[t][:, y][:, :, x]

    def read_chunk(self, part: str, chunk: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) of the part's valid pixels in one chunk, physical units: the reference path
        (numpy on dask arrays), not the fast loader."""
        window = self.chunk_slices(chunk)
        spec = self.spec
        arrays = [np.asarray(self.cube[v].data[window]) for v in (*spec.inputs, spec.target)]
        origin = tuple(w.start for w in window)
        valid = valid_mask(arrays[:-1], arrays[-1], self.selections[part], origin)
        mask = self.part_mask(part, window)
        if mask is not None:
            valid &= mask
        return _samples_of(valid, arrays[:-1], arrays[-1], self.coords, spec.coord_features, origin)

    def iter_part(self, part: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for chunk in self.part_chunks(part):
            yield self.read_chunk(part, chunk)

    def load_part(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        """All (X, y) of a part in memory, physical units, chunk order. For small cubes."""
        pieces = list(self.iter_part(part))
        if not pieces:
            return np.empty((0, len(self.spec.features))), np.empty(0)
        return np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])

    def normalize(self, x: np.ndarray, y: np.ndarray | None = None):
        """Features (and target) scaled with the train-only statistics."""
        xn = (x - self.feature_mean) / self.feature_std
        return xn if y is None else (xn, (y - self.target_mean) / self.target_std)

    def summary(self) -> dict:
        spec = self.spec
        return {
            "task": spec.name,
            "cube": self.cube.attrs.get("cubebench_source", "?"),
            "fingerprint": self.fingerprint,
            "features": list(spec.features),
            "target": f"{spec.target} [{self.target_units}]",
            "region": str(spec.region) if spec.region else "all",
            "time": " .. ".join(spec.time_range) if spec.time_range else "all",
            "split": str(spec.split),
            "layout_dependent_split": spec.split.layout_dependent,
            "seed": spec.seed,
            "chunk_shape": list(self.chunk_shape),
            "block_shape": list(self.block_shape),
            "blocks": {p: len(b) for p, b in self.blocks.items()},
            "blocks_without_samples": self.blocks_without_samples,
            "blocks_in_both_boxes": self.blocks_in_both_boxes,
            "buffered": {p: dict(v) for p, v in self.buffered.items()},
            "samples": dict(self.samples),
            **(self._window_summary() if self.windows else {}),
            "feature_mean": dict(zip(spec.features, self.feature_mean.round(6).tolist())),
            "feature_std": dict(zip(spec.features, self.feature_std.round(6).tolist())),
            "target_mean": round(self.target_mean, 6),
            "target_std": round(self.target_std, 6),
            "noise_floor": self.noise_floor,
        }

    def _window_summary(self) -> dict:
        patch, windows = self.spec.patch, self.windows
        assert patch is not None and windows is not None
        return {
            "geometry": "patch",
            "patch": list(patch.size),
            "stride": list(patch.step),
            "gap_fraction": patch.gap_fraction,
            "target_pixels": dict(windows.targets),
            "windows_dropped_across_parts": windows.dropped_across_parts,
            "windows_without_targets": windows.without_targets,
        }

    def _repr_html_(self) -> str:
        """The summary as a table (Jupyter)."""
        from cubebench.display import facts_table

        return facts_table(self.summary(), f"prepared task {self.spec.name}")


def _block_rank_key(seed: int, block: tuple[int, int, int]) -> bytes:
    """A seeded hash of a block's position: its place in the split order."""
    return hashlib.blake2b(
        f"{seed}:{block[0]}:{block[1]}:{block[2]}".encode(), digest_size=8
    ).digest()


def assign_blocks(
    blocks: list[tuple[int, int, int]],
    fractions: tuple[float, float, float],
    seed: int,
    names: tuple[str, str, str] = PARTS,
) -> dict[str, list[tuple[int, int, int]]]:
    """Order blocks by a seeded hash and cut the order in the requested fractions.

    Every part with a positive fraction gets at least one block, or a TaskError says why not.
    """
    order = sorted(blocks, key=lambda b: _block_rank_key(seed, b))
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if len(order) < len(wanted):
        raise TaskError(
            f"only {len(order)} block(s) hold valid samples, too few for a "
            f"{'/'.join(names[i] for i in wanted)} split; use smaller blocks (--split), "
            "a larger region or a longer time range"
        )
    n = len(order)
    counts = [max(1, round(f * n)) if f > 0 else 0 for f in fractions]
    # the last positive part takes the remainder, never less than one block
    last = wanted[-1]
    counts[last] = 0
    counts[last] = n - sum(counts)
    while counts[last] < 1:
        donor = max(range(3), key=lambda i: counts[i] if i != last else -1)
        counts[donor] -= 1
        counts[last] += 1
    out, start = {}, 0
    for name, count in zip(names, counts):
        out[name] = order[start : start + count]
        start += count
    return out


def _selection(ds: xr.Dataset, box: Box | None, time_range: tuple[str, str] | None) -> Selection:
    lat, lon = ds["lat"].values, ds["lon"].values
    time = ds["time"]
    if time_range is None:
        tmask = np.ones(time.size, bool)
    else:
        index = time.to_index()
        dates = [parse_time(v) for v in time_range]
        start, end = in_calendar(index, dates, f"time range {time_range}")
        tmask = np.asarray((index >= start) & (index <= end))
    return Selection(
        tmask,
        box.lat_mask(lat) if box else np.ones(lat.size, bool),
        box.lon_mask(lon) if box else np.ones(lon.size, bool),
    )


def _block_slices(edges: Sequence[np.ndarray], block: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(int(e[b]), int(e[b + 1])) for e, b in zip(edges, block))


def _runs_touched(edges: np.ndarray, runs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(units along the axis, runs): how many indices of each unit (a chunk, bounded by
    `edges`) lie in each run (the block of each index: `runs`) and in `mask`."""
    out = np.zeros((len(edges) - 1, int(runs.max()) + 1), np.int64)
    unit = np.repeat(np.arange(len(edges) - 1), np.diff(edges))
    np.add.at(out, (unit, runs), mask.astype(np.int64))
    return out


def prepare_task(spec: TaskSpec, cube: xr.Dataset, scheduler: str | None = None) -> PreparedTask:
    """Bind `spec` to `cube`: split blocks, count samples, compute train-only statistics.

    `scheduler`: see `cubebench.cluster` (None: dask's threads; `local[:N]`; an address).
    """
    spec.validate()
    names = (*spec.inputs, spec.target)
    ds = xr.Dataset({v: require_variable(cube, v) for v in names}, attrs=dict(cube.attrs))
    if ds[spec.target].chunks is None:  # an in-memory dataset: one chunk
        ds = ds.chunk(dict.fromkeys(("time", "lat", "lon"), -1))
    target = ds[spec.target]
    chunks = target.chunks
    chunk_shape = tuple(int(c[0]) for c in chunks)
    split = spec.split
    blocks_of = grid_of(split, ds, chunks)
    runs = [blocks_of.index(a) for a in range(3)]

    coords = CoordArrays(
        lat=ds["lat"].values.astype(np.float64),
        lon=ds["lon"].values.astype(np.float64),
        season=season_of(ds["time"]),
    )
    region = split.kind == "region"
    if region:
        source = _selection(ds, spec.source_box, spec.time_range)
        tgt = _selection(ds, spec.target_box, spec.time_range)
        selections = dict.fromkeys(PARTS, source) | dict.fromkeys(TARGET_PARTS, tgt)
        groups = [(source, PARTS), (tgt, TARGET_PARTS)]
    else:
        sel = _selection(ds, spec.region, spec.time_range)
        selections = dict.fromkeys(PARTS, sel)
        groups = [(sel, PARTS)]
    time_part = None
    if split.kind == "time":
        time_part = time_parts(split, ds, spec.fractions, groups[0][0].time)

    # which selection group every block belongs to (-1: none; -2: both, would leak)
    hits = np.zeros(blocks_of.shape, np.int64)
    group_of_block = np.full(blocks_of.shape, -1, np.int64)
    for g, (selection, _) in enumerate(groups):
        touched = [
            np.add.reduceat(mask.astype(np.int64), e[:-1].astype(np.intp)) > 0
            for mask, e in zip((selection.time, selection.lat, selection.lon), blocks_of.edges)
        ]
        inside = np.ix_(*touched)
        mine = np.zeros(blocks_of.shape, bool)
        mine[inside] = True
        hits += mine
        group_of_block[mine] = g
    in_both = int((hits > 1).sum())
    group_of_block[hits > 1] = -2

    arrays = [ds[v].data for v in spec.inputs]
    tgt_data = target.data
    chunk_edges = [np.concatenate([[0], np.cumsum(c)]).astype(np.int64) for c in chunks]
    chunk_grid = tuple(len(c) for c in chunks)
    tasks, chunk_list = [], []
    for chunk in np.ndindex(*chunk_grid):
        window = _block_slices(chunk_edges, chunk)
        local_runs = tuple(r[w] for r, w in zip(runs, window))
        if (group_of_block[np.ix_(*(np.unique(r) for r in local_runs))] < 0).all():
            continue  # in no group's blocks: nothing to count
        ts, ys, xs = window
        tasks.append(
            dask.delayed(_chunk_stats)(
                [a[ts, ys, xs] for a in arrays],
                tgt_data[ts, ys, xs],
                coords,
                [selection for selection, _ in groups],
                group_of_block,
                local_runs,
                spec.coord_features,
                (ts.start, ys.start, xs.start),
                spec.patch,
                spec.seed,
            )
        )
        chunk_list.append(chunk)
    try:
        computed = _compute(tasks, scheduler)
    except Exception:  # a corrupted chunk fails deep in a codec: say which variable and chunk
        raise_unreadable_chunk(ds, names, (_block_slices(chunk_edges, c) for c in chunk_list))
        raise
    piece_block = np.concatenate([c[0] for c in computed] or [np.zeros(0, np.int64)])
    piece_n = np.concatenate([c[1] for c in computed] or [np.zeros(0, np.int64)])
    width = len(spec.features) + 1
    piece_mean = np.concatenate([c[2] for c in computed] or [np.zeros((0, width))])
    piece_m2 = np.concatenate([c[3] for c in computed] or [np.zeros((0, width))])
    piece_chunk = np.repeat(np.arange(len(chunk_list)), [len(c[0]) for c in computed])
    block_count = np.bincount(piece_block, piece_n, blocks_of.size).astype(np.int64)
    block_count = block_count.reshape(blocks_of.shape)

    part_of_block = np.full(blocks_of.shape, -1, np.int64)
    empty = 0
    for g, (_, parts) in enumerate(groups):
        mine = group_of_block == g
        nonempty = mine & (block_count > 0)
        empty += int((mine & (block_count == 0)).sum())
        if not nonempty.any():
            where = spec.target_box if g == 1 else (spec.source_box or spec.region)
            raise TaskError(
                f"no valid samples of {spec.target!r} (with finite {', '.join(spec.inputs)}) "
                f"in region {where or 'all'}, time {spec.time_range or 'all'}"
            )
        codes = [spec.parts.index(p) for p in parts]
        if time_part is not None:
            t = np.nonzero(nonempty)[0]
            part_of_block[nonempty] = np.asarray(codes)[time_part[blocks_of.edges[0][t]]]
            continue
        by_id: dict[tuple[int, int, int], list[tuple[int, ...]]] = {}
        for block in map(tuple, np.argwhere(nonempty)):
            key = tuple(int(blocks_of.ids[a][block[a]]) for a in range(3))
            by_id.setdefault(key, []).append(block)
        for part, ids in assign_blocks(list(by_id), spec.fractions, spec.seed, parts).items():
            for key in ids:
                for block in by_id[key]:
                    part_of_block[block] = spec.parts.index(part)
    _check_parts(spec, part_of_block, block_count, "the split")

    orders = [[spec.parts.index(p) for p in parts] for _, parts in groups]
    dropped = buffer_out(part_of_block, split.buffer, blocks_of.periodic, orders)
    buffered = {
        p: {
            "blocks": int((dropped & (part_of_block == c)).sum()),
            "samples": int(block_count[dropped & (part_of_block == c)].sum()),
        }
        for c, p in enumerate(spec.parts)
    }
    part_of_block[dropped] = BUFFER
    if split.buffer:
        _check_parts(spec, part_of_block, block_count, f"a buffer of {split.buffer} block(s)")

    blocks = {p: np.argwhere(part_of_block == c).astype(np.int64) for c, p in enumerate(spec.parts)}
    samples = {p: int(block_count[part_of_block == c].sum()) for c, p in enumerate(spec.parts)}
    piece_part = part_of_block.reshape(-1)[piece_block]
    chunk_cells = {}
    chunk_samples: dict[str, dict[tuple[int, int, int], int]] = {}
    for c, p in enumerate(spec.parts):
        sel = selections[p]
        cells = (part_of_block == c).astype(np.int64)
        for axis, mask in enumerate((sel.time, sel.lat, sel.lon)):
            touched = _runs_touched(chunk_edges[axis], runs[axis], mask)
            cells = np.moveaxis(np.tensordot(touched, cells, axes=(1, axis)), 0, axis)
        chunk_cells[p] = cells
        counts = dict.fromkeys(map(tuple, np.argwhere(cells > 0).tolist()), 0)
        mine = piece_part == c
        for k, n in zip(piece_chunk[mine], piece_n[mine]):
            counts[chunk_list[k]] = counts.get(chunk_list[k], 0) + int(n)
        chunk_samples[p] = counts  # type: ignore[assignment]
    windows = None
    if spec.patch is not None:
        shape = tuple(int(n) for n in target.shape)
        cells_of = [c[4] for c in computed]
        windows = _windows(spec, shape, blocks_of, part_of_block, cells_of)
        samples = {p: len(windows.origins[p]) for p in spec.parts}
    train = piece_part == spec.parts.index("train")
    moments = merged(piece_n[train], piece_mean[train], piece_m2[train])
    std = moments.std
    std = np.where(std > 0, std, 1.0)  # a constant feature is left unscaled, not divided by 0

    noise_floor = cube.attrs.get("cubebench_noise_floor")
    floor_var = cube.attrs.get("cubebench_noise_floor_variable")
    return PreparedTask(
        spec=spec,
        cube=ds,
        fingerprint=_fingerprint(ds, names),
        chunk_shape=chunk_shape,
        grid=blocks_of,
        part_of_block=part_of_block,
        coords=coords,
        selections=selections,
        blocks=blocks,
        samples=samples,
        feature_mean=moments.mean[:-1],
        feature_std=std[:-1],
        target_mean=float(moments.mean[-1]),
        target_std=float(std[-1]),
        target_units=str(target.attrs.get("units", "")),
        noise_floor=float(noise_floor)
        if noise_floor is not None and floor_var == spec.target
        else None,
        blocks_without_samples=empty,
        blocks_in_both_boxes=in_both,
        buffered=buffered,
        windows=windows,
        chunk_samples=chunk_samples,
        chunk_cells=chunk_cells,
    )


def _check_parts(
    spec: TaskSpec, part_of_block: np.ndarray, block_count: np.ndarray, what: str
) -> None:
    """Every part the task asks for holds a valid sample, or a TaskError says which is empty."""
    wanted = spec.fractions * (2 if spec.split.kind == "region" else 1)
    if spec.split.kind == "time" and spec.split.dates is not None:
        wanted = (1.0, 1.0, 1.0)  # three periods, each with samples
    for code, (part, fraction) in enumerate(zip(spec.parts, wanted)):
        if fraction > 0 and not block_count[part_of_block == code].sum():
            raise TaskError(
                f"{what} ({spec.split}) leaves the {part} part without valid samples; "
                "choose other dates, blocks, buffer or region"
            )


def _windows(
    spec: TaskSpec,
    shape: tuple[int, int, int],
    blocks_of: Grid,
    part_of_block: np.ndarray,
    chunk_cells: list,
) -> Windows:
    """The windows of every part, from the per-chunk cell counts of the dask pass. A window
    touching a buffered block and a part's is dropped like one across two parts."""
    patch = spec.patch
    assert patch is not None
    cells = np.zeros(n_cells(shape, patch.step), np.int64)
    for first, counts in chunk_cells:
        cells[tuple(slice(f, f + n) for f, n in zip(first, counts.shape))] += counts
    buffer_code = len(spec.parts)
    codes = np.where(part_of_block == BUFFER, buffer_code, part_of_block)
    placed = place_windows(patch, shape, blocks_of.edges, codes, (*spec.parts, "buffer"), cells)
    windows = Windows(
        {p: placed.origins[p] for p in spec.parts},
        {p: placed.targets[p] for p in spec.parts},
        placed.dropped_across_parts,
        placed.without_targets,
    )
    for part, fraction in zip(spec.parts, spec.fractions):
        if fraction > 0 and not len(windows.origins[part]):
            raise TaskError(
                f"no {tuple(patch.size)} window with pixels to fill lies inside the {part} "
                f"blocks alone ({windows.dropped_across_parts} windows touch two parts); use "
                "smaller patches or larger blocks (--split)"
            )
    return windows


def _fingerprint(ds: xr.Dataset, names: Sequence[str]) -> str:
    try:
        return cube_fingerprint(ds)
    except Exception:
        raise_unreadable_chunk(ds, names)
        raise


def _compute(tasks: list, scheduler: str | None) -> list[Moments]:
    with dask_client(scheduler) as client:
        if client is None:
            return list(dask.compute(*tasks))
        return list(client.compute(tasks, sync=True))
