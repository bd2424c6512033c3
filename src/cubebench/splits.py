"""How a task's samples are split into parts, in the units of the science, not of the storage.

A split is a **grid of blocks** over the cube (runs of indices along time, lat and lon) and a
part for every block:

* `blocks:46d,10deg`: blocks of 46 days × 10° (lat and lon; `10deg,20deg` for lat, lon), or
  of pixels and time steps (`4t,64px`), anchored at the cube's first date, 90°S and 180°W
  (pixel and step blocks at index 0); blocks holding a valid sample are ranked by a seeded
  hash of their position and cut in the task's fractions;
* `time:2015-12-31,2017-12-31`: train up to the first date, val up to the second, test after;
  `time` alone cuts the task's time steps in its fractions (train first, test last). Every
  time step is a block, so a buffer counts steps;
* `region[:46d,10deg]`: the transfer split: blocks in the source box and in the target box,
  each group cut in the fractions (blocks touching both boxes are in neither);
* `chunks[:1,2,2]`: blocks of whole storage chunks (here 1 × 2 × 2). The fastest, as no chunk
  is shared by two parts, but **the parts change with the layout**: accuracy on two layouts is
  then scored on two test sets.

The grid does not follow the chunks (but for `chunks`), so a chunk may hold samples of several
parts: the loader reads it once per part that needs it and masks it to the part.

A **buffer** of N blocks leaves out the blocks of a part that lie within N blocks (diagonals
included, across the antimeridian on a global cube) of a block of a later part: train gives
way to val and test, val to test, the test part stays whole.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cubebench.dates import date_fields, in_calendar, parse_time
from cubebench.errors import TaskError

KINDS = ("blocks", "time", "region", "chunks")
TIME_UNITS = {"d": "days", "t": "time steps"}
SPACE_UNITS = {"deg": "degrees", "px": "pixels"}
_LENGTH = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*")


def _length(text: str, units: dict[str, str], what: str) -> tuple[float, str]:
    match = _LENGTH.fullmatch(text)
    if match is None or match.group(2) not in units or float(match.group(1)) <= 0:
        known = ", ".join(f"'{u}' ({name})" for u, name in units.items())
        raise TaskError(f"a {what} block is a positive length in {known}, got {text!r}")
    value, unit = float(match.group(1)), match.group(2)
    if unit in ("t", "px") and not value.is_integer():
        raise TaskError(f"a {what} block in {units[unit]} is a whole number, got {text!r}")
    return value, unit


def _fmt(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Split:
    """A split kind and its grid; see the module's docstring. `Split.parse("time:2016-01-01,
    2018-01-01")` reads the CLI's form and `str(split)` writes it back."""

    kind: str = "blocks"
    time_block: str = "46d"  # blocks, region: days ("46d") or time steps ("4t")
    space_block: str = "10deg"  # blocks, region: "10deg", "10deg,20deg" (lat, lon), "64px"
    dates: tuple[str, str] | None = None  # time: the ends of train and of val
    block_chunks: tuple[int, int, int] = (1, 1, 1)  # chunks: chunks per block (time, lat, lon)
    buffer: int = 0  # blocks left out next to a later part's

    def __post_init__(self) -> None:
        for name in ("dates", "block_chunks"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise TaskError(f"split must be one of {', '.join(KINDS)}, got {self.kind!r}")
        b = self.buffer
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 0:
            raise TaskError(f"a buffer is a whole number of blocks >= 0, got {b!r}")
        if self.kind in ("blocks", "region"):
            _ = self.time_length, self.space_lengths  # each raises if unreadable
        if self.kind == "time" and self.dates is not None:
            if not isinstance(self.dates, tuple) or len(self.dates) != 2:
                raise TaskError(
                    f"a time split is 'time:END_OF_TRAIN,END_OF_VAL', got {self.dates!r}"
                )
            first, second = (parse_time(d) for d in self.dates)
            if date_fields(first) >= date_fields(second):
                raise TaskError(
                    f"time split periods out of order: {self.dates[0]} is not before "
                    f"{self.dates[1]} (train ends first, then val)"
                )
        k = self.block_chunks
        if not (
            isinstance(k, tuple)
            and len(k) == 3
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in k)
            and min(k) >= 1
        ):
            raise TaskError(f"chunks per block must be 3 positive integers, got {k!r}")

    @property
    def time_length(self) -> tuple[float, str]:
        return _length(self.time_block, TIME_UNITS, "time")

    @property
    def space_lengths(self) -> tuple[tuple[float, str], tuple[float, str]]:
        texts = self.space_block.split(",")
        if len(texts) not in (1, 2):
            raise TaskError(f"a space block is 'LAT[,LON]', got {self.space_block!r}")
        lat = _length(texts[0], SPACE_UNITS, "space")
        lon = _length(texts[-1], SPACE_UNITS, "space")
        if lat[1] != lon[1]:
            raise TaskError(f"lat and lon blocks in one unit please, got {self.space_block!r}")
        return lat, lon

    @property
    def layout_dependent(self) -> bool:
        return self.kind == "chunks"

    @classmethod
    def parse(cls, text: str, buffer: int = 0) -> Split:
        """`blocks[:TIME,SPACE[,SPACE]]`, `time:DATE,DATE`, `region[:TIME,SPACE]`,
        `chunks[:T,Y,X]`."""
        kind, _, rest = text.strip().partition(":")
        if kind not in KINDS:
            raise TaskError(
                f"split must be one of {', '.join(KINDS)} (e.g. 'blocks:46d,10deg'), got {text!r}"
            )
        if kind == "time":
            if not rest:
                return cls(kind, buffer=buffer)
            dates = tuple(d.strip() for d in rest.split(","))
            if len(dates) != 2 or not all(dates):
                raise TaskError(f"a time split is 'time:END_OF_TRAIN,END_OF_VAL', got {text!r}")
            return cls(kind, dates=dates, buffer=buffer)  # type: ignore[arg-type]
        if kind == "chunks":
            if not rest:
                return cls(kind, buffer=buffer)
            try:
                per_block = tuple(int(v) for v in rest.split(","))
            except ValueError:
                per_block = ()
            if len(per_block) != 3:
                raise TaskError(
                    f"a chunks split is 'chunks[:T,Y,X]' (chunks per block), got {text!r}"
                )
            return cls(kind, block_chunks=per_block, buffer=buffer)  # type: ignore[arg-type]
        if not rest:
            return cls(kind, buffer=buffer)
        time_block, _, space_block = rest.partition(",")
        if not space_block:
            raise TaskError(f"a {kind} grid is 'TIME,SPACE' (e.g. '46d,10deg'), got {text!r}")
        return cls(kind, time_block.strip(), space_block.replace(" ", ""), buffer=buffer)

    def __str__(self) -> str:
        if self.kind == "time":
            text = f"time:{self.dates[0]},{self.dates[1]}" if self.dates else "time"
        elif self.kind == "chunks":
            text = "chunks:" + ",".join(map(str, self.block_chunks))
        else:
            text = f"{self.kind}:{self.time_block},{self.space_block}"
        return text + (f" buffer {self.buffer}" if self.buffer else "")


@dataclass(frozen=True)
class Grid:
    """Blocks as runs of indices per axis: `edges[a]` the runs' bounds (from 0 to the axis's
    length), `ids[a]` a name for each run that does not depend on the chunking (the seeded
    ranking hashes it), and `periodic` where the last lon run touches the first (a global cube)."""

    edges: tuple[np.ndarray, np.ndarray, np.ndarray]
    ids: tuple[np.ndarray, np.ndarray, np.ndarray]
    periodic: tuple[bool, bool, bool] = (False, False, False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(e) - 1 for e in self.edges)  # type: ignore[return-value]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def index(self, axis: int) -> np.ndarray:
        """The block (run) of every index along `axis` (computed once: every chunk decode
        masks with it)."""
        return self._indices[axis]

    @functools.cached_property
    def _indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.repeat(np.arange(len(e) - 1), np.diff(e)) for e in self.edges)  # type: ignore[return-value]

    def block_shape(self) -> tuple[int, int, int]:
        """The longest run per axis: a block's nominal size in pixels."""
        return tuple(int(np.diff(e).max()) for e in self.edges)  # type: ignore[return-value]


def _runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal labels: their bounds and their labels."""
    labels = np.asarray(labels)
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    return np.append(starts, len(labels)).astype(np.int64), labels[starts]


def _days_since_start(time) -> np.ndarray:
    """Days from the cube's first time step (any calendar)."""
    index = time.to_index()
    return np.asarray((index - index[0]) / pd.Timedelta(days=1), np.float64)


def _space_labels(values: np.ndarray, length: tuple[float, str], axis: str) -> np.ndarray:
    size, unit = length
    if unit == "px":
        return np.arange(len(values)) // int(size)
    values = np.asarray(values, np.float64)
    if axis == "lat":  # bands from the south pole; the pole itself is in the top band
        top = math.ceil(180.0 / size) - 1
        return np.clip(np.floor((values + 90.0) / size), 0, top).astype(np.int64)
    east = (values + 180.0) % 360.0  # longitudes of any convention, from 180°W
    return np.floor(east / size).astype(np.int64)


def _is_global(lon: np.ndarray) -> bool:
    """Whether the longitudes go round the Earth (their spacing times their count is 360°)."""
    if len(lon) < 2:
        return False
    step = abs(float(np.median(np.diff(lon))))
    return abs(step * len(lon) - 360.0) <= 0.5 * step


def grid_of(split: Split, cube, chunks: tuple[tuple[int, ...], ...]) -> Grid:
    """The split's blocks on `cube` (its time, lat and lon) whose chunks along each axis are
    `chunks` (dask's form): only the `chunks` kind uses them."""
    lat, lon = cube["lat"].values, cube["lon"].values
    periodic = (False, False, _is_global(lon))
    if split.kind == "chunks":
        out = []
        for sizes, k in zip(chunks, split.block_chunks):
            labels = np.repeat(np.arange(len(sizes)) // k, sizes)
            out.append(_runs(labels))
        return Grid(*zip(*out), periodic=periodic)  # type: ignore[arg-type]
    nt = cube.sizes["time"]
    if split.kind == "time":
        time_labels = np.arange(nt)
    else:
        size, unit = split.time_length
        if unit == "t":
            time_labels = np.arange(nt) // int(size)
        else:
            time_labels = np.floor(_days_since_start(cube["time"]) / size).astype(np.int64)
    if split.kind == "time":
        lat_labels, lon_labels = np.zeros(len(lat), np.int64), np.zeros(len(lon), np.int64)
        periodic = (False, False, False)
    else:
        lat_len, lon_len = split.space_lengths
        lat_labels = _space_labels(lat, lat_len, "lat")
        lon_labels = _space_labels(lon, lon_len, "lon")
    runs = [_runs(labels) for labels in (time_labels, lat_labels, lon_labels)]
    return Grid(*zip(*runs), periodic=periodic)  # type: ignore[arg-type]


def time_parts(
    split: Split, cube, fractions: tuple[float, float, float], selected: np.ndarray
) -> np.ndarray:
    """For a `time` split: the part (0 train, 1 val, 2 test) of every time step; without
    dates, the `selected` steps cut in `fractions`, in order."""
    if split.dates is None:
        steps = np.flatnonzero(selected)
        cuts = np.round(np.cumsum(fractions)[:2] * len(steps)).astype(np.int64)
        ends = steps[np.minimum(cuts, len(steps) - 1)] if len(steps) else np.zeros(2, np.int64)
        ends = np.where(cuts < len(steps), ends, len(selected))  # a part reaching the end
        at = np.arange(len(selected))
        return np.where(at < ends[0], 0, np.where(at < ends[1], 1, 2)).astype(np.int64)
    index = cube["time"].to_index()
    dates = [parse_time(d) for d in split.dates]  # type: ignore[union-attr]
    first, second = in_calendar(index, dates, f"time split {split.dates}")
    start, end = index[0], index[-1]
    for date in (first, second):
        if not start <= date < end:
            raise TaskError(
                f"time split date {date} is outside the cube's time axis ({start} .. {end}): "
                "every period needs time steps"
            )
    return np.where(index <= first, 0, np.where(index <= second, 1, 2)).astype(np.int64)


def buffer_out(
    part_of_block: np.ndarray,
    buffer: int,
    periodic: tuple[bool, bool, bool],
    order: list[list[int]],
) -> np.ndarray:
    """Blocks to leave out: those of a part within `buffer` blocks of a block of a later part
    of its group (`order`: each group's part codes, first gives way to later).

    A block-grid index distance, diagonals included (Chebyshev); periodic axes wrap."""
    from scipy.ndimage import maximum_filter

    out = np.zeros(part_of_block.shape, bool)
    if buffer == 0:
        return out
    modes = ["wrap" if p else "constant" for p in periodic]
    for codes in order:
        for i, code in enumerate(codes[:-1]):
            later = np.isin(part_of_block, codes[i + 1 :])
            near = maximum_filter(later, size=2 * buffer + 1, mode=modes, cval=0)
            out |= near & (part_of_block == code)
    return out
