"""A task prepared once and identically for every library.

`TaskSpec` says what to predict from what, where and when; `prepare_task` turns it into a
`PreparedTask` against a cube:

* the cube is cut into **blocks aligned to its storage chunks** (a block is a whole number of
  chunks), so a loader reads each chunk for exactly one part and no block is in two parts;
* blocks holding at least one valid sample are ranked by a seeded hash and assigned to
  train / val / test in the requested fractions (or, in `region` mode, by source and target box);
* normalisation statistics come from **train blocks only**, in one NaN-safe dask pass that also
  counts the valid samples of every block and chunk (on a `distributed` cluster when one is given).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import dask
import numpy as np
import pandas as pd
import xarray as xr

from cubebench.cluster import dask_client
from cubebench.cube.fingerprint import cube_fingerprint
from cubebench.cube.integrity import raise_unreadable_chunk
from cubebench.cube.schema import require_variable
from cubebench.errors import TaskError
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


def parse_time(value: object) -> pd.Timestamp:
    """A date of a time range (`"2001-03-01"`, a datetime...) as a tz-naive Timestamp.

    A date that only a 360_day calendar has (`"2001-02-30"`, climate model output) comes back
    as a cftime date of that calendar; `_selection` checks it against the cube's calendar.
    """
    text_or_stamp = isinstance(value, str | np.datetime64 | pd.Timestamp)
    if isinstance(value, bool) or not (text_or_stamp or hasattr(value, "year")):  # a datetime
        raise TaskError(f"a date is text like '2001-03-01', got {value!r}")
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError, OverflowError) as exc:
        other = _date_360_day(value)
        if other is not None:
            return other
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise TaskError(f"not a date: {value!r} ({reason!r})") from None
    if stamp is pd.NaT or pd.isna(stamp):
        raise TaskError(f"not a date: {value!r}")
    if stamp.tzinfo is not None:
        raise TaskError(f"a date without a time zone please (cube times have none), got {value!r}")
    return stamp


def _date_360_day(value: object):
    """`"YYYY-MM-DD"` with a day every month has in a 360_day calendar (29 or 30 February)."""
    import re

    match = (
        re.fullmatch(r"\s*(\d{4})-(\d{1,2})-(\d{1,2})\s*", value)
        if isinstance(value, str)
        else None
    )
    if match is None:
        return None
    import cftime

    try:
        return cftime.datetime(*map(int, match.groups()), calendar="360_day")
    except ValueError:
        return None


def _date_fields(date) -> tuple[int, ...]:
    """(year, month, day, hour, minute, second): orders dates of any calendar."""
    return tuple(
        int(getattr(date, f)) for f in ("year", "month", "day", "hour", "minute", "second")
    )


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
    if _date_fields(start) > _date_fields(end):
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
    block_chunks: tuple[int, int, int] = (1, 1, 1)  # chunks per block along time, lat, lon
    split: Literal["blocks", "region"] = "blocks"
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
        return PARTS + TARGET_PARTS if self.split == "region" else PARTS

    def __post_init__(self) -> None:
        # lists become tuples (hashable, and `features` concatenates them); then every field
        # is checked, so a bad spec fails where it is made, before any cube is opened
        for name in ("inputs", "coord_features", "fractions", "block_chunks", "time_range"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
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
        b = self.block_chunks
        if not (
            isinstance(b, tuple)
            and len(b) == 3
            and all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in b)
            and min(b) >= 1
        ):
            raise TaskError(f"block_chunks must be 3 positive integers, got {b!r}")
        for field in ("region", "source_box", "target_box"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, Box):
                raise TaskError(f"{field} must be a Box or None, got {value!r}")
        if self.time_range is not None:
            _check_time_range(self.time_range)
        if self.split not in ("blocks", "region"):
            raise TaskError(f"split must be 'blocks' or 'region', got {self.split!r}")
        if self.split == "region" and (self.source_box is None or self.target_box is None):
            raise TaskError("region split needs both a source box and a target box")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TaskError(f"seed must be an integer, got {self.seed!r}")
        if self.patch is not None:
            if not isinstance(self.patch, Patch):
                raise TaskError(f"patch must be a Patch or None, got {self.patch!r}")
            self.patch.validate()
            if self.split != "blocks":
                raise TaskError("the patch geometry supports the 'blocks' split only")


# The reference use case of the DeepESDL ML toolkits.
TASKS: dict[str, TaskSpec] = {
    "lst-from-t2m": TaskSpec(),
    "lst-from-t2m-transfer": TaskSpec(
        name="lst-from-t2m-transfer",
        split="region",
        source_box=Box(20.0, 70.0),
        target_box=Box(-60.0, -10.0),
    ),
    # fill LST gaps in 16 x 16 windows from air temperature and the visible LST around them;
    # blocks of 2 x 2 chunks in space keep most windows inside one part
    "lst-gapfill": TaskSpec(name="lst-gapfill", patch=Patch(), block_chunks=(1, 2, 2)),
}


def get_task(name: str, **overrides: object) -> TaskSpec:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return replace(TASKS[name], **{k: v for k, v in overrides.items() if v is not None})


# --- samples of one block: the reference definition every loader must reproduce ---------


@dataclass(frozen=True)
class Selection:
    """Which pixels of the cube the task may use, as three 1-D masks (time, lat, lon)."""

    time: np.ndarray
    lat: np.ndarray
    lon: np.ndarray

    def any_in(self, ts: slice, ys: slice, xs: slice) -> bool:
        return bool(self.time[ts].any() and self.lat[ys].any() and self.lon[xs].any())


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


def block_samples(
    inputs: Sequence[np.ndarray],
    target: np.ndarray,
    coords: CoordArrays,
    selection: Selection,
    coord_features: Sequence[str],
    origin: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of every valid pixel of one block, in C order; float64, physical units.

    `origin` is the block's first (time, lat, lon) index. A pixel is valid when it lies in the
    selection and every input and the target are finite.
    """
    valid = valid_mask(inputs, target, selection, origin)
    return _samples_of(valid, inputs, target, coords, coord_features, origin)


def valid_mask(
    inputs: Sequence[np.ndarray],
    target: np.ndarray,
    selection: Selection,
    origin: tuple[int, int, int],
) -> np.ndarray:
    """The block's valid pixels: in the selection, every input and the target finite."""
    nt, ny, nx = target.shape
    t0, y0, x0 = origin
    sel = (
        selection.time[t0 : t0 + nt, None, None]
        & selection.lat[None, y0 : y0 + ny, None]
        & selection.lon[None, None, x0 : x0 + nx]
    )
    valid = sel & np.isfinite(target)
    for a in inputs:
        valid &= np.isfinite(a)
    return valid


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

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        if len(values) == 0:
            return cls(0, np.zeros(values.shape[1]), np.zeros(values.shape[1]))
        mean = values.mean(axis=0)
        return cls(len(values), mean, ((values - mean) ** 2).sum(axis=0))

    def __add__(self, other: Moments) -> Moments:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        return Moments(n, mean, m2)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n) if self.n else np.full_like(self.mean, np.nan)


def _block_stats(
    inputs: list[np.ndarray],
    target: np.ndarray,
    coords: CoordArrays,
    selection: Selection,
    coord_features: tuple[str, ...],
    origin: tuple[int, int, int],
    patch: Patch | None = None,
    seed: int = 0,
    chunk_starts: tuple[np.ndarray, ...] | None = None,
) -> tuple[Moments, tuple | None, np.ndarray | None]:
    """The block's moments; for the patch geometry, its target pixels per cell; and, given
    the offsets of its chunks' starts along each axis (`chunk_starts`, from 0), the valid
    samples of each of its chunks as a (chunks along time, lat, lon) array."""
    valid = valid_mask(inputs, target, selection, origin)
    x, y = _samples_of(valid, inputs, target, coords, coord_features, origin)
    moments = Moments.of(np.column_stack([x, y]))
    per_chunk = None
    if chunk_starts is not None:
        per_chunk = valid.astype(np.int64)
        for axis, starts in enumerate(chunk_starts):
            per_chunk = np.add.reduceat(per_chunk, np.asarray(starts, np.intp), axis=axis)
    if patch is None:
        return moments, None, per_chunk
    ts, ys, xs = (slice(o, o + n) for o, n in zip(origin, target.shape))
    targets = valid & hidden_mask(patch, seed, ts, ys, xs)
    return moments, cell_counts(targets, origin, patch.step), per_chunk


# --- the prepared task ----------------------------------------------------------------------


@dataclass
class PreparedTask:
    """A task bound to a cube: blocks per part, sample counts and train-only statistics."""

    spec: TaskSpec
    cube: xr.Dataset
    fingerprint: str
    chunk_shape: tuple[int, int, int]
    block_shape: tuple[int, int, int]
    block_edges: tuple[np.ndarray, np.ndarray, np.ndarray]  # block boundaries per axis
    coords: CoordArrays
    selections: dict[str, Selection]  # per part
    blocks: dict[str, np.ndarray]  # part -> (k, 3) block indices, sorted
    samples: dict[str, int]  # part -> valid samples
    feature_mean: np.ndarray
    feature_std: np.ndarray
    target_mean: float
    target_std: float
    target_units: str
    noise_floor: float | None
    blocks_without_samples: int
    blocks_in_both_boxes: int = 0
    windows: Windows | None = None  # patch geometry: the windows of every part
    # part -> {chunk index (time, lat, lon): valid pixels of that chunk in the part}, for
    # every chunk of the part's blocks (0 included); sums to `samples` for the pixel geometry
    chunk_samples: dict[str, dict[tuple[int, int, int], int]] = dataclasses.field(
        default_factory=dict
    )

    @property
    def block_grid(self) -> tuple[int, int, int]:
        return tuple(len(e) - 1 for e in self.block_edges)  # type: ignore[return-value]

    def block_slices(self, block: Sequence[int]) -> tuple[slice, slice, slice]:
        return _block_slices(self.block_edges, block)

    def read_block(self, part: str, block: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) of one block in physical units: the reference path, not the fast loader."""
        ts, ys, xs = self.block_slices(block)
        spec = self.spec
        arrays = [np.asarray(self.cube[v].data[ts, ys, xs]) for v in (*spec.inputs, spec.target)]
        return block_samples(
            arrays[:-1],
            arrays[-1],
            self.coords,
            self.selections[part],
            spec.coord_features,
            (ts.start, ys.start, xs.start),
        )

    def iter_part(self, part: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for block in self.blocks[part]:
            yield self.read_block(part, block)

    def load_part(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        """All (X, y) of a part in memory, physical units, block order. For small cubes."""
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
            "split": spec.split,
            "seed": spec.seed,
            "chunk_shape": list(self.chunk_shape),
            "block_shape": list(self.block_shape),
            "blocks": {p: len(b) for p, b in self.blocks.items()},
            "blocks_without_samples": self.blocks_without_samples,
            "blocks_in_both_boxes": self.blocks_in_both_boxes,
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
            f"{'/'.join(names[i] for i in wanted)} split; use smaller chunks (or block_chunks), "
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
        start, end = (parse_time(v) for v in time_range)
        index = time.to_index()
        if isinstance(index, pd.DatetimeIndex):
            if not isinstance(start, pd.Timestamp) or not isinstance(end, pd.Timestamp):
                raise TaskError(f"time range {time_range} is not in the cube's standard calendar")
        else:  # cftime calendars (360_day, noleap...) compare with dates of their own calendar
            cls = type(index[0])
            try:
                start, end = (cls(*_date_fields(v)) for v in (start, end))
            except ValueError as exc:
                raise TaskError(
                    f"time range {time_range} not in the cube's calendar: {exc}"
                ) from None
        tmask = np.asarray((index >= start) & (index <= end))
    return Selection(
        tmask,
        box.lat_mask(lat) if box else np.ones(lat.size, bool),
        box.lon_mask(lon) if box else np.ones(lon.size, bool),
    )


def _block_edges(chunks: tuple[int, ...], per_block: int) -> np.ndarray:
    """Block boundaries along one axis: every `per_block`-th chunk boundary, plus the end."""
    edges = np.concatenate([[0], np.cumsum(chunks)])
    picked = edges[::per_block]
    return picked if picked[-1] == edges[-1] else np.append(picked, edges[-1])


def _block_slices(edges: Sequence[np.ndarray], block: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(int(e[b]), int(e[b + 1])) for e, b in zip(edges, block))


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
    block_shape = tuple(s * k for s, k in zip(chunk_shape, spec.block_chunks))
    edges = tuple(_block_edges(c, k) for c, k in zip(chunks, spec.block_chunks))
    grid = tuple(len(e) - 1 for e in edges)

    coords = CoordArrays(
        lat=ds["lat"].values.astype(np.float64),
        lon=ds["lon"].values.astype(np.float64),
        season=season_of(ds["time"]),
    )
    if spec.split == "region":
        source = _selection(ds, spec.source_box, spec.time_range)
        tgt = _selection(ds, spec.target_box, spec.time_range)
        selections = dict.fromkeys(PARTS, source) | dict.fromkeys(TARGET_PARTS, tgt)
    else:
        sel = _selection(ds, spec.region, spec.time_range)
        selections = dict.fromkeys(PARTS, sel)

    def slices(block):
        return _block_slices(edges, block)

    all_blocks = [tuple(int(i) for i in b) for b in np.ndindex(*grid)]
    groups = {"source": selections["train"]}
    if spec.split == "region":
        groups["target"] = selections["target_train"]
    candidates: dict[str, list[tuple[int, int, int]]] = {g: [] for g in groups}
    in_both = 0
    for block in all_blocks:
        hits = [g for g, s in groups.items() if s.any_in(*slices(block))]
        if len(hits) == 1:
            candidates[hits[0]].append(block)
        elif len(hits) == 2:
            in_both += 1  # would leak between source and target: used by neither

    arrays = [ds[v].data for v in spec.inputs]
    tgt_data = target.data
    chunk_edges = [np.concatenate([[0], np.cumsum(c)]).astype(np.int64) for c in chunks]

    def first_chunks(block) -> tuple[tuple[int, ...], tuple[np.ndarray, ...]]:
        """The block's first chunk index per axis, and its chunks' starts from the block's."""
        first, starts = [], []
        for e, w in zip(chunk_edges, slices(block)):
            lo, hi = np.searchsorted(e, [w.start, w.stop])
            first.append(int(lo))
            starts.append(e[lo:hi] - w.start)
        return tuple(first), tuple(starts)

    tasks = []
    keys = []
    for group, blocks in candidates.items():
        for block in blocks:
            ts, ys, xs = slices(block)
            tasks.append(
                dask.delayed(_block_stats)(
                    [a[ts, ys, xs] for a in arrays],
                    tgt_data[ts, ys, xs],
                    coords,
                    groups[group],
                    spec.coord_features,
                    (ts.start, ys.start, xs.start),
                    spec.patch,
                    spec.seed,
                    first_chunks(block)[1],
                )
            )
            keys.append((group, block))
    try:
        computed = _compute(tasks, scheduler)
    except Exception:  # a corrupted chunk fails deep in a codec: say which variable and chunk
        raise_unreadable_chunk(ds, names, (slices(block) for _, block in keys))
        raise
    by_block = {key: m for key, (m, _, _) in zip(keys, computed)}
    per_chunk = {key: counts for key, (_, _, counts) in zip(keys, computed)}

    assigned: dict[str, list] = {}
    empty = 0
    for group in candidates:
        nonempty = [b for (g, b), m in by_block.items() if g == group and m.n > 0]
        empty += sum(1 for (g, _), m in by_block.items() if g == group and m.n == 0)
        if not nonempty:
            where = spec.target_box if group == "target" else (spec.source_box or spec.region)
            raise TaskError(
                f"no valid samples of {spec.target!r} (with finite {', '.join(spec.inputs)}) "
                f"in region {where or 'all'}, time {spec.time_range or 'all'}"
            )
        names = TARGET_PARTS if group == "target" else PARTS
        assigned |= assign_blocks(nonempty, spec.fractions, spec.seed, names)

    blocks = {p: np.array(sorted(assigned[p]), dtype=np.int64).reshape(-1, 3) for p in spec.parts}
    group_of = {p: ("target" if p in TARGET_PARTS else "source") for p in spec.parts}
    samples = {
        p: int(sum(by_block[(group_of[p], tuple(b))].n for b in blocks[p])) for p in spec.parts
    }
    chunk_samples: dict[str, dict[tuple[int, int, int], int]] = {}
    for p in spec.parts:
        chunk_samples[p] = {}
        for b in blocks[p]:
            first = first_chunks(tuple(b))[0]
            counts = per_chunk[(group_of[p], tuple(b))]
            for local in np.ndindex(*counts.shape):
                chunk = tuple(f + i for f, i in zip(first, local))
                chunk_samples[p][chunk] = int(counts[local])  # type: ignore[index]
    windows = None
    if spec.patch is not None:
        shape = tuple(int(n) for n in target.shape)
        windows = _windows(spec, shape, edges, grid, blocks, [c for _, c, _ in computed])
        samples = {p: len(windows.origins[p]) for p in spec.parts}
    train = Moments(0, np.zeros(len(spec.features) + 1), np.zeros(len(spec.features) + 1))
    for b in blocks["train"]:
        train = train + by_block[("source", tuple(b))]
    std = train.std
    std = np.where(std > 0, std, 1.0)  # a constant feature is left unscaled, not divided by 0

    noise_floor = cube.attrs.get("cubebench_noise_floor")
    floor_var = cube.attrs.get("cubebench_noise_floor_variable")
    prepared = PreparedTask(
        spec=spec,
        cube=ds,
        fingerprint=_fingerprint(ds, names),
        chunk_shape=chunk_shape,
        block_shape=block_shape,
        block_edges=edges,
        coords=coords,
        selections=selections,
        blocks=blocks,
        samples=samples,
        feature_mean=train.mean[:-1],
        feature_std=std[:-1],
        target_mean=float(train.mean[-1]),
        target_std=float(std[-1]),
        target_units=str(target.attrs.get("units", "")),
        noise_floor=float(noise_floor)
        if noise_floor is not None and floor_var == spec.target
        else None,
        blocks_without_samples=empty,
        blocks_in_both_boxes=in_both,
        windows=windows,
        chunk_samples=chunk_samples,
    )
    return prepared


def _windows(
    spec: TaskSpec,
    shape: tuple[int, int, int],
    edges: tuple[np.ndarray, ...],
    grid: tuple[int, ...],
    blocks: dict[str, np.ndarray],
    block_cells: list,
) -> Windows:
    """The windows of every part, from the per-block cell counts of the dask pass."""
    patch = spec.patch
    assert patch is not None
    cells = np.zeros(n_cells(shape, patch.step), np.int64)
    for first, counts in block_cells:
        cells[tuple(slice(f, f + n) for f, n in zip(first, counts.shape))] += counts
    part_of_block = np.full(grid, -1, np.int64)
    for code, part in enumerate(spec.parts):
        part_of_block[tuple(blocks[part].T)] = code
    windows = place_windows(patch, shape, edges, part_of_block, spec.parts, cells)
    for part, fraction in zip(spec.parts, spec.fractions):
        if fraction > 0 and not len(windows.origins[part]):
            raise TaskError(
                f"no {tuple(patch.size)} window with pixels to fill lies inside the {part} "
                f"blocks alone ({windows.dropped_across_parts} windows touch two parts); use "
                "smaller patches or larger blocks (block_chunks)"
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
