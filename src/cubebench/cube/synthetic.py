"""Synthetic ESDC-like cubes whose best achievable accuracy is known.

Land surface temperature (LST) is a deterministic function of the task's features (air
temperature, latitude, day of year) plus Gaussian noise of known standard deviation: that
standard deviation is the **noise floor**, the lowest test RMSE any model can reach. The northern
and southern hemispheres follow related but different regimes, for transfer learning.

Every value is a pure function of (seed, global index), so a cube is identical whatever its
chunking, and generation streams chunk by chunk through dask: memory is bounded by a few
chunks, not by the cube.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import uuid
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from cubebench import interrupts
from cubebench.cluster import dask_client, parse_local
from cubebench.cube.schema import PROFILES, Profile
from cubebench.errors import CubeError
from cubebench.hashing import splitmix64

GENERATOR_VERSION = 1
STEPS_PER_YEAR = 46  # ESDC 8-daily axis: 46 steps per year, restarting on 1 January
START_YEAR = 2001
EARTH_RADIUS_KM = 6371.0
NOISE_FLOOR_K = 1.5  # std of the LST noise: the best achievable RMSE
LAYOUTS = ("map", "ts", "balanced")
SLAB_ELEMENTS = 1 << 17  # pixels computed at once inside a chunk: bounds float64 temporaries
BASIS_CACHE_BYTES = 32 << 20  # per smooth field: spatial bases kept for the next chunks
_BASIS_LOCK = threading.Lock()  # dask computes chunks in threads
# Boxes (lat_min, lat_max, lon_min, lon_max) in which one LST regime dominates.
REGIONS = {"north": (20.0, 70.0, -180.0, 180.0), "south": (-60.0, -10.0, -180.0, 180.0)}


@dataclass(frozen=True)
class Preset:
    name: str
    years: int
    resolution_deg: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return (
            self.years * STEPS_PER_YEAR,
            round(180 / self.resolution_deg),
            round(360 / self.resolution_deg),
        )


PRESETS = {
    "tiny": Preset("tiny", 1, 4.0),  # 46 x 45 x 90: ~2 MB decoded, for CI
    "small": Preset("small", 4, 1.0),  # 184 x 180 x 360: ~143 MB decoded
    "medium": Preset("medium", 4, 0.5),  # 184 x 360 x 720: ~572 MB decoded (4 x small)
    "large": Preset("large", 10, 0.25),  # 460 x 720 x 1440: ~5.7 GB decoded (ESDC 0.25 deg)
}


def parse_chunks(text: str) -> tuple[int, int, int]:
    """`"t,y,x"` -> a chunk shape, or a CubeError."""
    try:
        chunks = tuple(int(v) for v in text.split(","))
    except ValueError:
        chunks = ()
    if len(chunks) != 3 or min(chunks) < 1:
        raise CubeError(f"chunks must be three positive integers 't,y,x', got {text!r}")
    return chunks  # type: ignore[return-value]


def layout_chunks(layout: str, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Chunk shape of a named layout (or of an explicit `t,y,x`) for a cube of `shape`.

    map: one time step per chunk (fast maps, slow time series); ts: long time series of small
    square tiles (the ESDC's 256x128x128 at 0.25 deg); balanced: a quarter of every axis.
    """
    nt, ny, nx = shape
    if layout == "map":
        return (1, ny, nx)
    if layout == "ts":
        tile = math.ceil(ny / 4)
        return (min(nt, 256), tile, tile)
    if layout == "balanced":
        return (math.ceil(nt / 4), math.ceil(ny / 4), math.ceil(nx / 4))
    if "," in layout:  # a chunk longer than its axis is the whole axis
        return tuple(min(c, n) for c, n in zip(parse_chunks(layout), shape))  # type: ignore[return-value]
    raise CubeError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)} or 't,y,x'")


def make_grid(preset: Preset) -> tuple[pd.DatetimeIndex, np.ndarray, np.ndarray]:
    """ESDC-style grid: 8-daily time, latitudes descending from the north, cell centres."""
    res = preset.resolution_deg
    _, ny, nx = preset.shape
    days = pd.to_timedelta(np.arange(STEPS_PER_YEAR) * 8, unit="D")
    time = pd.DatetimeIndex(
        [pd.Timestamp(START_YEAR + y, 1, 1) + d for y in range(preset.years) for d in days]
    )
    lat = 90.0 - res / 2 - res * np.arange(ny)
    lon = -180.0 + res / 2 + res * np.arange(nx)
    return time, lat, lon


# --- the generating function -------------------------------------------------------------


def season_angle(day_of_year: np.ndarray, days_in_year: np.ndarray) -> np.ndarray:
    """Angle of the annual cycle: the same definition as the task's sin/cos day-of-year."""
    return 2.0 * np.pi * (np.asarray(day_of_year) - 1.0) / np.asarray(days_in_year)


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def lst_oracle(t2m_k: np.ndarray, lat_deg: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Expected LST (K) given air temperature (K), latitude and season angle (broadcasting).

    The north follows a linear-in-insolation regime, the south a quadratic one with a stronger
    heat threshold; a logistic blend in latitude joins them. A model that sees air temperature,
    latitude and sin/cos of the day of year can learn it exactly; the rest is noise.
    """
    declination = np.deg2rad(23.44) * np.sin(angle - 2.0 * np.pi * 80.0 / 365.0)
    insolation = np.maximum(0.0, np.cos(np.deg2rad(lat_deg) - declination))
    north = 5.0 * insolation + 3.0 * _softplus((t2m_k - 288.0) / 4.0)
    south = 7.0 * insolation**2 + 2.0 * _softplus((t2m_k - 293.0) / 3.0) - 1.0
    weight_north = 1.0 / (1.0 + np.exp(-lat_deg / 4.0))
    return t2m_k - 2.0 + weight_north * north + (1.0 - weight_north) * south


GENERATING_FUNCTION = (
    "LST = T2m - 2 + w*(5*I + 3*softplus((T2m-288)/4)) + (1-w)*(7*I^2 + 2*softplus((T2m-293)/3)"
    " - 1) + N(0, noise_floor^2); I = max(0, cos(lat - declination(doy))), w = sigmoid(lat/4)"
)


def _climatology_k(lat_deg: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Mean air temperature: warm tropics, seasonal amplitude growing towards the poles."""
    s = np.sin(np.deg2rad(lat_deg))
    amplitude = 3.0 + 17.0 * np.abs(s) ** 1.2
    summer = np.cos(angle - 2.0 * np.pi * 199.0 / 365.0) * np.tanh(lat_deg / 10.0)
    return 301.0 - 42.0 * s**2 + amplitude * summer


# --- deterministic random fields -----------------------------------------------------------


def hashed_normal(
    key: int, t: np.ndarray, y: np.ndarray, x: np.ndarray, shape: tuple[int, int, int]
) -> np.ndarray:
    """Standard normal noise at global indices (t, y, x): independent of chunking."""
    _, ny, nx = shape
    linear = (t[:, None, None] * ny + y[None, :, None]) * nx + x[None, None, :]
    h1 = splitmix64(linear.astype(np.uint64) ^ np.uint64(key))
    h2 = splitmix64(h1)
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    u2 = (h2 >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@dataclass(frozen=True)
class SmoothField:
    """A sum of travelling waves on the sphere: correlated in space and time, with unit-free
    standard deviation `std`, evaluated at any (t, lat, lon) without neighbours or state."""

    waves: np.ndarray  # (K, 3) wave vectors, rad / km
    omega: np.ndarray  # (K,) rad / time step
    phase: np.ndarray  # (K,)
    amplitude: float

    @classmethod
    def draw(
        cls,
        rng: np.random.Generator,
        length_km: float,
        period_steps: float,
        std: float,
        k: int = 24,
    ) -> SmoothField:
        direction = rng.normal(size=(k, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        magnitude = 2.0 * np.pi / length_km * rng.uniform(0.5, 1.5, size=(k, 1))
        omega = (
            np.zeros(k)
            if period_steps == math.inf
            else 2.0 * np.pi / period_steps * rng.uniform(0.5, 2.0, size=k)
        )
        phase = rng.uniform(0.0, 2.0 * np.pi, size=k)
        return cls(direction * magnitude, omega, phase, std * math.sqrt(2.0 / k))

    def _basis(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of the waves' spatial phase on a window, (K, yx) each. Kept for the
        next chunks on the same window (every chunk of the map layout shares one), within
        BASIS_CACHE_BYTES per field; the values do not depend on it."""
        key = (lat[0], lat[-1], len(lat), lon[0], lon[-1], len(lon))
        cache: dict = self.__dict__.setdefault("_bases", {})
        with _BASIS_LOCK:
            hit = cache.get(key)
        if hit is not None:
            return hit
        la, lo = np.meshgrid(np.deg2rad(lat), np.deg2rad(lon), indexing="ij")
        points = EARTH_RADIUS_KM * np.stack(
            [np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1
        ).reshape(-1, 3)
        space = points @ self.waves.T  # (yx, K)
        basis = (np.cos(space).T, np.sin(space).T)
        room = max(1, BASIS_CACHE_BYTES // (2 * space.nbytes))
        with _BASIS_LOCK:
            while len(cache) >= room:  # first in, first out: dask walks chunks in order
                cache.pop(next(iter(cache)))
            cache[key] = basis
        return basis

    def __call__(self, t: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        cos_space, sin_space = self._basis(lat, lon)
        tau = np.outer(t, self.omega) + self.phase  # (t, K)
        # cos(s + tau) = cos(tau) cos(s) - sin(tau) sin(s): two matrix products
        values = np.cos(tau) @ cos_space - np.sin(tau) @ sin_space
        return (self.amplitude * values).reshape(len(t), len(lat), len(lon))


@dataclass(frozen=True)
class Generator:
    """Everything that defines the cube's values: preset, seed and the drawn fields."""

    preset: Preset
    seed: int
    profile: Profile

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, GENERATOR_VERSION])
        fields = {
            "relief": SmoothField.draw(rng, 2500.0, math.inf, 4.0),
            "weather": SmoothField.draw(rng, 1500.0, 4.0, 3.0),
            "cloud": SmoothField.draw(rng, 800.0, 8.0, 1.0),
            "moisture": SmoothField.draw(rng, 2000.0, 10.0, 1.0),
        }
        object.__setattr__(self, "fields", fields)
        time, lat, lon = make_grid(self.preset)
        object.__setattr__(self, "grid", (time, lat, lon))
        angle = season_angle(time.day_of_year.values, np.where(time.is_leap_year, 366, 365))
        object.__setattr__(self, "angle", angle)

    def __reduce__(self):
        # unpickled (in a dask worker) as this process's one generator of the same definition:
        # the chunk tasks a worker receives, each unpickled on its own, then share the drawn
        # fields and their basis caches instead of each holding copies
        return (shared_generator, (self.preset, self.seed, self.profile))

    @property
    def variables(self) -> list[str]:
        return list(self.profile.variables)

    def chunk(self, land: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        """All variables of one chunk, stacked on a leading axis (dask map_blocks)."""
        assert block_info is not None
        (_, _), (t0, t1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return self.values(slice(t0, t1), slice(y0, y1), slice(x0, x1), land)

    def values(self, ts: slice, ys: slice, xs: slice, land: np.ndarray) -> np.ndarray:
        """All variables on a window of the grid, as float32 (nvars, t, y, x).

        Computed in slabs of at most SLAB_ELEMENTS pixels, so the float64 temporaries stay
        small whatever the chunk shape: memory is the float32 chunk plus a constant.
        """
        nt, ny, nx = (s.stop - s.start for s in (ts, ys, xs))
        out = np.empty((len(self.variables), nt, ny, nx), np.float32)
        rows = max(1, min(ny, SLAB_ELEMENTS // nx))
        steps = max(1, SLAB_ELEMENTS // (rows * nx))
        for y0 in range(0, ny, rows):
            y1 = min(ny, y0 + rows)
            for t0 in range(0, nt, steps):
                t1 = min(nt, t0 + steps)
                out[:, t0:t1, y0:y1] = self._slab(
                    slice(ts.start + t0, ts.start + t1),
                    slice(ys.start + y0, ys.start + y1),
                    xs,
                    land,
                )
        return out

    def _slab(self, ts: slice, ys: slice, xs: slice, land: np.ndarray) -> np.ndarray:
        _time, lat_all, lon_all = self.grid
        shape = self.preset.shape
        t = np.arange(shape[0])[ts]
        y = np.arange(shape[1])[ys]
        x = np.arange(shape[2])[xs]
        lat, lon = lat_all[ys], lon_all[xs]
        angle = self.angle[ts][:, None, None]
        lat3 = lat[None, :, None]
        ocean = ~land[ys, xs][None]
        f = self.fields

        t2m = (
            _climatology_k(lat3, angle)
            + f["relief"](np.zeros(1), lat, lon)
            + f["weather"](t.astype(np.float64), lat, lon)
        )
        noise = hashed_normal(self.seed * 3 + 1, t, y, x, shape)
        lst = lst_oracle(t2m, lat3, angle) + NOISE_FLOOR_K * noise
        cloud_bias = 0.5 * np.exp(-((lat3 / 15.0) ** 2)) - 0.1
        cloudy = f["cloud"](t.astype(np.float64), lat, lon) + cloud_bias > 0.28
        lst[cloudy | ocean] = np.nan
        moisture = 0.25 + 0.07 * f["moisture"](t.astype(np.float64), lat, lon)
        moisture += 0.05 * np.cos(angle) * np.tanh(lat3 / 10.0)
        moisture = np.clip(moisture, 0.02, 0.5)
        moisture = np.where(ocean, np.nan, moisture)

        out = {
            "air_temperature_2m": t2m,
            "land_surface_temperature": lst,
            "root_moisture": moisture,
        }
        for name in self.profile.celsius:
            out[name] = out[name] - 273.15
        return np.stack([out[v] for v in self.variables]).astype(np.float32)


_SHARED_GENERATORS: dict[tuple, Generator] = {}
_SHARED_LOCK = threading.Lock()
SHARED_GENERATORS_KEPT = 2  # per process; each holds up to 4 x BASIS_CACHE_BYTES of bases


def shared_generator(preset: Preset, seed: int, profile: Profile) -> Generator:
    """This process's generator for (preset, seed, profile), made once (first in, first out)."""
    key = (preset, seed, repr(profile))
    with _SHARED_LOCK:
        gen = _SHARED_GENERATORS.get(key)
        if gen is None:
            gen = Generator(preset, seed, profile)
            while len(_SHARED_GENERATORS) >= SHARED_GENERATORS_KEPT:
                _SHARED_GENERATORS.pop(next(iter(_SHARED_GENERATORS)))
            _SHARED_GENERATORS[key] = gen
    return gen


# --- land mask -----------------------------------------------------------------------------


def _land_mask_from_coastlines(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    from global_land_mask import globe  # loads a ~1 GB 1-km mask: keep it in a child process

    la, lo = np.meshgrid(lat, lon, indexing="ij")
    return globe.is_land(la, lo)


def land_mask(lat: np.ndarray, lon: np.ndarray, cache: Path) -> np.ndarray:
    """Land (True) at cell centres from real coastlines, cached per grid.

    The coastline data decompresses to ~1 GB, so it is read in a spawned child process: the
    generating process keeps its memory bounded by chunks.
    """
    key = f"landmask-{len(lat)}x{len(lon)}-{lat[0]:.4f}-{lon[0]:.4f}.npy"
    path = cache / key
    if path.exists():
        return np.load(path)
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        mask = pool.submit(_land_mask_from_coastlines, lat, lon).result()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp.npy")
    np.save(tmp, mask)
    os.replace(tmp, path)
    return mask


# --- writing -------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where synthetic cubes live: $CUBEBENCH_CACHE or the user cache directory."""
    env = os.environ.get("CUBEBENCH_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("cubebench"))


def _encoding(chunks: tuple[int, int, int], zarr_format: int) -> dict:
    """Blosc-lz4 with byte shuffle, as in the ESDC."""
    if zarr_format == 2:
        from numcodecs import Blosc

        compressor = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)
    else:
        from zarr.codecs import BloscCodec

        compressor = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    return {"chunks": chunks, "compressors": (compressor,), "_FillValue": np.float32(np.nan)}


def build_dataset(
    preset: str = "tiny",
    seed: int = 0,
    layout: str = "balanced",
    profile: str = "esdc-2.1.1",
    land: np.ndarray | None = None,
) -> xr.Dataset:
    """The synthetic cube as a lazy dataset (dask, one task per chunk)."""
    if preset not in PRESETS:
        raise CubeError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    if profile not in PROFILES:
        raise CubeError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
    gen = Generator(PRESETS[preset], seed, PROFILES[profile])
    time, lat, lon = gen.grid
    shape = gen.preset.shape
    chunks = layout_chunks(layout, shape)
    if land is None:
        land = land_mask(lat, lon, cache_dir())
    nvars = len(gen.variables)
    dask_chunks = ((nvars,), *da.core.normalize_chunks(chunks, shape))
    stacked = da.map_blocks(
        gen.chunk,
        # one node of the graph that every chunk depends on: a cluster ships the mask to each
        # worker once, not inside every chunk's task
        land=dask.delayed(land, name=f"land-mask-{dask.base.tokenize(land)}"),
        chunks=dask_chunks,
        dtype=np.float32,
        meta=np.empty((0, 0, 0, 0), np.float32),
    )
    data_vars = {}
    for i, name in enumerate(gen.variables):
        info = gen.profile.variables[name]
        data_vars[name] = xr.Variable(
            ("time", "lat", "lon"),
            stacked[i],
            attrs={
                "units": info.units,
                "long_name": info.long_name,
                "standard_name": info.standard_name,
            },
        )
    coords = {
        "time": ("time", time.values, {"long_name": "time", "standard_name": "time"}),
        "lat": (
            "lat",
            lat,
            {"units": "degrees_north", "long_name": "latitude", "standard_name": "latitude"},
        ),
        "lon": (
            "lon",
            lon,
            {"units": "degrees_east", "long_name": "longitude", "standard_name": "longitude"},
        ),
    }
    attrs = {
        "title": f"cubebench synthetic Earth System Data Cube ({preset})",
        "Conventions": "CF-1.9",
        "esdc_version": gen.profile.esdc_version,
        "time_coverage_resolution": "P8D",
        "geospatial_resolution": f"{gen.preset.resolution_deg} deg",
        "cubebench_generator_version": GENERATOR_VERSION,
        "cubebench_preset": preset,
        "cubebench_seed": seed,
        "cubebench_layout": layout,
        "cubebench_profile": profile,
        "cubebench_regions": json.dumps(REGIONS),
    }
    if "land_surface_temperature" in gen.variables:
        attrs |= {
            "cubebench_noise_floor": NOISE_FLOOR_K,
            "cubebench_noise_floor_variable": "land_surface_temperature",
            "cubebench_generating_function": GENERATING_FUNCTION,
        }
    return xr.Dataset(data_vars, coords, attrs)


def write_cube(
    ds: xr.Dataset, path: Path, zarr_format: int = 3, scheduler: str | None = None
) -> Path:
    """Write `ds` to `path` atomically: a temporary sibling, renamed when complete.

    `scheduler` (see `cubebench.cluster`): None computes the chunks in this process's threads;
    `local[:N]` or a scheduler address computes and writes them in the cluster's workers,
    which must see `path` (the same bytes either way).
    """
    if zarr_format not in (2, 3):
        raise CubeError(f"zarr format must be 2 or 3, got {zarr_format}")
    if scheduler is not None:
        parse_local(scheduler)  # a bad `local:N` fails before anything is written
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise CubeError(f"cannot write under {path.parent}: {exc.strerror or exc}") from None
    try:
        first = next(iter(ds.data_vars.values()))
        chunks = tuple(c[0] for c in first.chunks)
        encoding = {name: _encoding(chunks, zarr_format) for name in ds.data_vars}
        # consolidated metadata in both formats, as the ESDC's stores have it (xarray warns
        # when opening a store without); an active client: to_zarr computes on its workers
        # (the generator's temporaries are large and short-lived: glibc's malloc defaults
        # suit them, see dask_client)
        with dask_client(scheduler, malloc_trim=False), warnings.catch_warnings():
            # zarr: consolidated metadata is "not part of the Zarr format 3 specification"
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            ds.to_zarr(tmp, mode="w", zarr_format=zarr_format, encoding=encoding, consolidated=True)
        interrupts.check()  # interrupted, even where a library swallowed it: commit nothing
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.replace(tmp, path)
    except OSError as exc:
        raise CubeError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
