"""Real cubes come in several conventions; each must give the samples of the one definition.

Every cube here is written in the test (Zarr v3 and NetCDF through h5netcdf) from numpy arrays
kept at hand, and every check compares what cubebench delivers (the reference path
`PreparedTask.load_part`, the fast loader through every chunk reader, the train-only
statistics) with the same quantity computed directly with numpy from those arrays:

* latitudes north→south (ESDC) and south→north;
* longitudes -180..180 and 0..360 (ERA5), with boxes given in -180..180 or across 180°;
* missing values as CF `_FillValue` / `missing_value` and int16 packed with scale and offset;
* a 360_day calendar (cftime times, as climate models write them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from cubebench.cube import open_cube
from cubebench.loading import ChunkStream, available_readers
from cubebench.task import Box, TaskSpec, prepare_task

SHAPE = (8, 12, 24)  # time, lat, lon
CHUNKS = (4, 3, 6)  # 2 x 4 x 4 chunks
LAT = np.linspace(82.5, -82.5, SHAPE[1])  # every 15°, north to south as in the ESDC
LON = np.linspace(-172.5, 172.5, SHAPE[2])  # every 15°
TIME = pd.date_range("2001-01-01", periods=SHAPE[0], freq="45D")
DIMS = ("time", "lat", "lon")
FEATURES = ("lat", "lon", "sin_doy", "cos_doy")
T2M, LST = "air_temperature_2m", "land_surface_temperature"
FILL = -9999.0

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")


# --- the arrays and their cubes ---------------------------------------------------------------


def _fields() -> tuple[np.ndarray, np.ndarray]:
    """Air and land surface temperature (float32, K) with missing pixels in both."""
    rng = np.random.default_rng(7)
    t2m = (280.0 + 10.0 * rng.standard_normal(SHAPE)).astype(np.float32)
    lst = (285.0 + 10.0 * rng.standard_normal(SHAPE)).astype(np.float32)
    lst[rng.random(SHAPE) < 0.3] = np.nan  # clouds
    t2m[rng.random(SHAPE) < 0.05] = np.nan
    return t2m, lst


T2M_DATA, LST_DATA = _fields()


def _season(time) -> np.ndarray:
    """2*pi*(day_of_year - 1)/days_in_year from the dates' own fields, for any calendar."""
    if isinstance(time, pd.DatetimeIndex):
        doy, days = time.day_of_year.to_numpy(), np.where(time.is_leap_year, 366, 365)
    else:  # 360_day: twelve months of thirty days
        doy, days = np.array([(t.month - 1) * 30 + t.day for t in time]), 360
    return 2.0 * np.pi * (doy - 1.0) / days


@dataclass(frozen=True)
class Cube:
    """A cube as written, with the values xarray decodes from it (NaN where missing)."""

    path: Path
    t2m: np.ndarray
    lst: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    season: np.ndarray


def _write(
    path: Path,
    fmt: str,
    *,
    south_north: bool = False,
    lon_0_360: bool = False,
    encoding: dict | None = None,
    time=TIME,
) -> Cube:
    """The arrays above in one convention, written as Zarr v3 or NetCDF-4 (h5netcdf)."""
    ilat = np.arange(SHAPE[1])[::-1] if south_north else np.arange(SHAPE[1])
    lon = LON % 360.0 if lon_0_360 else LON
    ilon = np.argsort(lon)
    t2m, lst = (a[:, ilat][:, :, ilon] for a in (T2M_DATA, LST_DATA))
    ds = xr.Dataset(
        {T2M: (DIMS, t2m, {"units": "K"}), LST: (DIMS, lst, {"units": "K"})},
        coords={"time": time, "lat": LAT[ilat], "lon": lon[ilon]},
    )
    chunk_key = "chunks" if fmt == "zarr" else "chunksizes"
    enc = {name: {**(encoding or {}), chunk_key: CHUNKS} for name in ds.data_vars}
    if fmt == "zarr":
        path = path.with_suffix(".zarr")
        ds.to_zarr(path, zarr_format=3, encoding=enc)
    else:
        path = path.with_suffix(".nc")
        ds.to_netcdf(path, engine="h5netcdf", encoding=enc)
    if encoding and "scale_factor" in encoding:  # what int16 packing keeps of the values
        scale, offset = encoding["scale_factor"], encoding["add_offset"]
        t2m, lst = (
            np.round((a.astype(np.float64) - offset) / scale) * scale + offset for a in (t2m, lst)
        )
    return Cube(path, t2m, lst, LAT[ilat], lon[ilon], _season(time))


def _wrap(lon: np.ndarray) -> np.ndarray:
    return (np.asarray(lon) + 180.0) % 360.0 - 180.0


def _selection(cube: Cube, lats=None, lons=None, steps=None) -> np.ndarray:
    """(time, lat, lon) mask of the pixels a box should select: explicit sets of centres."""
    t = np.ones(SHAPE[0], bool) if steps is None else np.isin(np.arange(SHAPE[0]), steps)
    y = np.ones(SHAPE[1], bool) if lats is None else np.isin(cube.lat, lats)
    x = np.ones(SHAPE[2], bool) if lons is None else np.isin(_wrap(cube.lon), lons)
    return t[:, None, None] & y[None, :, None] & x[None, None, :]


def _pixels(cube: Cube, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of the valid pixels of `mask`, straight from the arrays: the reference."""
    valid = mask & np.isfinite(cube.t2m) & np.isfinite(cube.lst)
    it, iy, ix = np.nonzero(valid)
    season = cube.season[it]
    x = np.column_stack(
        [cube.t2m[valid], cube.lat[iy], cube.lon[ix], np.sin(season), np.cos(season)]
    )
    return x.astype(np.float64), cube.lst[valid].astype(np.float64)


def _keyed(x: np.ndarray, y: np.ndarray, season: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Samples sorted by their pixel: (time step from the season features, lat, lon)."""
    angle = np.arctan2(x[:, 3], x[:, 4])
    distance = np.abs(np.angle(np.exp(1j * (angle[:, None] - season[None, :]))))
    step = distance.argmin(axis=1)
    assert (distance.min(axis=1) < 1e-4).all(), "a season feature matches no time step"
    key = np.column_stack([step, np.round(x[:, 1] * 2), np.round(x[:, 2] * 2)]).astype(np.int64)
    order = np.lexsort(key.T[::-1])
    return key[order], np.column_stack([x, y])[order]


def _delivered(task, reader: str | None) -> tuple[np.ndarray, np.ndarray]:
    """All samples of all parts in physical units: the reference path or the loader."""
    xs, ys = [], []
    for part in task.spec.parts:
        if reader is None:
            x, y = task.load_part(part)
        else:
            stream = ChunkStream(task, part, batch_size=97, reader=reader, buffer_chunks=3)
            batches = list(stream.batches(epoch=0))
            x = np.concatenate([b[0] for b in batches]).astype(np.float64)
            y = np.concatenate([b[1] for b in batches]).astype(np.float64)
            x = x * task.feature_std + task.feature_mean
            y = y * task.target_std + task.target_mean
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _check_samples(task, cube: Cube, mask: np.ndarray) -> None:
    """Reference path and every reader deliver exactly the valid pixels of `mask`."""
    want_key, want = _keyed(*_pixels(cube, mask), cube.season)
    assert len(want) > 0
    assert sum(task.samples.values()) == len(want)
    for reader in [None, *available_readers(task.cube)]:
        key, got = _keyed(*_delivered(task, reader), cube.season)
        np.testing.assert_array_equal(key, want_key, err_msg=f"reader {reader}")
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3, err_msg=f"reader {reader}")


def _check_statistics(task, cube: Cube, mask: np.ndarray) -> None:
    """Train-only mean and std equal numpy's over the train blocks' valid pixels."""
    train = np.zeros(SHAPE, bool)
    for block in task.blocks["train"]:
        train[task.block_slices(block)] = True
    x, y = _pixels(cube, mask & train)
    values = np.column_stack([x, y])
    np.testing.assert_allclose(task.feature_mean, values[:, :-1].mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(task.feature_std, values[:, :-1].std(axis=0), rtol=1e-7)
    # the target mean is numpy's nanmean over the train blocks, missing pixels left out
    usable = mask & train & np.isfinite(cube.t2m)
    lst = np.where(usable, cube.lst.astype(np.float64), np.nan)
    assert task.target_mean == pytest.approx(np.nanmean(lst), rel=1e-12)
    assert task.target_std == pytest.approx(y.std(), rel=1e-9)


def _spec(**kw) -> TaskSpec:
    return TaskSpec(coord_features=FEATURES, **kw)


# --- latitudes north→south and south→north, longitudes -180..180 and 0..360 ---------------

ALL_LATS = LAT.tolist()
BOXES = {  # box -> the centres it must select (longitudes in -180..180)
    "europe": (Box(30, 60, -10, 40), [37.5, 52.5], [-7.5, 7.5, 22.5, 37.5]),
    "west": (Box(-40, 40, -100, -80), [-37.5, -22.5, -7.5, 7.5, 22.5, 37.5], [-97.5, -82.5]),
    "across-180": (Box(-90, 90, 160, 200), ALL_LATS, [172.5, -172.5]),
}


@pytest.fixture(scope="module")
def grids(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("grids")
    return {
        (fmt, sn, l360): _write(root / f"{fmt}-{sn}-{l360}", fmt, south_north=sn, lon_0_360=l360)
        for fmt in ("zarr", "nc")
        for sn in (False, True)
        for l360 in (False, True)
    }


# every box on Zarr (four readers); NetCDF (xarray's reader) with one box, to keep it quick
GRID_CASES = [
    pytest.param(
        fmt,
        sn,
        l360,
        box,
        id=f"{fmt}-{'S-N' if sn else 'N-S'}-{'0..360' if l360 else '-180..180'}-{box}",
    )
    for fmt, boxes in (("zarr", list(BOXES)), ("nc", ["europe"]))
    for sn in (False, True)
    for l360 in (False, True)
    for box in boxes
]


@pytest.mark.parametrize(("fmt", "south_north", "lon_0_360", "box"), GRID_CASES)
def test_grid_orientation_and_regions(grids, fmt, south_north, lon_0_360, box):
    cube = grids[(fmt, south_north, lon_0_360)]
    region, lats, lons = BOXES[box]
    ds = open_cube(cube.path)
    lat_step = float(ds["lat"][1] - ds["lat"][0])
    assert (lat_step > 0) == south_north  # the cube really is in this convention
    assert float(ds["lon"].max()) > 180.0 if lon_0_360 else float(ds["lon"].min()) < 0.0
    task = prepare_task(_spec(region=region), ds)
    mask = _selection(cube, lats, lons)
    _check_samples(task, cube, mask)
    _check_statistics(task, cube, mask)


# --- missing values as CF _FillValue / missing_value, int16 packed ---------------------------

ENCODINGS = {
    "fill-value": {"_FillValue": FILL},
    "missing-value": {"missing_value": FILL},
    "packed-int16": {
        "dtype": "int16",
        "scale_factor": 0.01,
        "add_offset": 280.0,
        "_FillValue": -32768,
    },
}


def _stored(path: Path, name: str) -> np.ndarray:
    """The raw stored values of a variable, before any CF decoding."""
    if path.suffix == ".zarr":
        import zarr

        return np.asarray(zarr.open_array(path, path=name, mode="r")[...])
    import h5py

    with h5py.File(path, "r") as f:
        return f[name][...]


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("fmt", ["zarr", pytest.param("nc", marks=pytest.mark.slow)])
def test_cf_missing_values_are_missing(tmp_path, fmt, encoding):
    enc = ENCODINGS[encoding]
    cube = _write(tmp_path / "cube", fmt, encoding=enc)
    marker = enc.get("_FillValue", enc.get("missing_value"))
    for name, data in ((T2M, T2M_DATA), (LST, LST_DATA)):  # the store holds markers, not NaN
        raw = _stored(cube.path, name)
        assert raw.dtype == np.dtype(enc.get("dtype", np.float32))
        np.testing.assert_array_equal(raw == marker, np.isnan(data))
    ds = open_cube(cube.path)
    task = prepare_task(_spec(), ds)
    if fmt == "zarr":  # the raw readers, which bypass xarray's decoding, are among those checked
        assert {"tensorstore", "zarr"} <= set(available_readers(task.cube))
    mask = np.ones(SHAPE, bool)
    _check_samples(task, cube, mask)  # every reader: fill pixels dropped, values decoded
    _check_statistics(task, cube, mask)


# --- a 360_day calendar -----------------------------------------------------------------------

TIME_360 = xr.date_range(
    "2001-01-01", periods=SHAPE[0], freq="45D", calendar="360_day", use_cftime=True
)  # 1 Jan, 16 Feb, 1 Apr, 16 May, 1 Jul, 16 Aug, 1 Oct, 16 Nov


@pytest.mark.parametrize("fmt", ["zarr", pytest.param("nc", marks=pytest.mark.slow)])
def test_360_day_calendar(tmp_path, fmt):
    cube = _write(tmp_path / "cube", fmt, time=TIME_360)
    ds = open_cube(cube.path)
    assert ds["time"].dt.calendar == "360_day"
    # day of year 1, 46, 91, ... of 360: the season turns once in 360 days, not 365
    np.testing.assert_allclose(
        cube.season, 2 * np.pi * (np.arange(SHAPE[0]) * 45) / 360, rtol=0, atol=1e-12
    )
    # 30 February exists in this calendar; both ends are inclusive
    task = prepare_task(_spec(time_range=("2001-02-30", "2001-07-01")), ds)
    np.testing.assert_allclose(task.coords.season, cube.season, rtol=0, atol=1e-12)
    mask = _selection(cube, steps=[2, 3, 4])  # 1 Apr, 16 May, 1 Jul
    _check_samples(task, cube, mask)
    _check_statistics(task, cube, mask)
