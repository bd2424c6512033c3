"""`open_cube(spec)`: one entry point for synthetic, local and remote cubes."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import xarray as xr

from cubebench.cube.schema import DIMS, canonicalize
from cubebench.cube.synthetic import (
    GENERATOR_VERSION,
    build_dataset,
    cache_dir,
    write_cube,
)
from cubebench.errors import CubeError

REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https", "az", "abfs", "memory")
NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".h5", ".hdf5")


@dataclass(frozen=True)
class SyntheticSpec:
    """`synthetic:<preset>?layout=...&seed=...&format=2|3&profile=...`"""

    preset: str = "tiny"
    layout: str = "balanced"
    seed: int = 0
    zarr_format: int = 3
    profile: str = "esdc-2.1.1"

    @classmethod
    def parse(cls, spec: str) -> SyntheticSpec:
        body = spec.removeprefix("synthetic:")
        preset, _, query = body.partition("?")
        options = dict(parse_qsl(query, keep_blank_values=True))
        known = {"layout", "seed", "format", "profile"}
        unknown = set(options) - known
        if unknown:
            raise CubeError(
                f"unknown option(s) {', '.join(sorted(unknown))} in {spec!r}; "
                f"known: {', '.join(sorted(known))}"
            )
        try:
            seed = int(options.get("seed", 0))
            zarr_format = int(options.get("format", 3))
        except ValueError as exc:
            raise CubeError(f"bad number in {spec!r}: {exc}") from None
        return cls(
            preset=preset or "tiny",
            layout=options.get("layout", "balanced"),
            seed=seed,
            zarr_format=zarr_format,
            profile=options.get("profile", "esdc-2.1.1"),
        )

    @property
    def cache_name(self) -> str:
        layout = self.layout.replace(",", "x")
        return (
            f"{self.preset}-{layout}-seed{self.seed}-{self.profile}"
            f"-zarr{self.zarr_format}-gen{GENERATOR_VERSION}.zarr"
        )


def make_cube(
    preset: str = "tiny",
    seed: int = 0,
    layout: str = "balanced",
    zarr_format: int = 3,
    profile: str = "esdc-2.1.1",
    output: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic cube (to `output`, or once into the cache) and return its path."""
    spec = SyntheticSpec(preset, layout, seed, zarr_format, profile)
    path = Path(output) if output is not None else cache_dir() / spec.cache_name
    if path.exists() and not overwrite:
        if output is None:
            return path
        raise CubeError(f"{path} exists; pass --force to overwrite it")
    ds = build_dataset(preset=preset, seed=seed, layout=layout, profile=profile)
    return write_cube(ds, path, zarr_format)


def _is_remote(spec: str) -> bool:
    scheme = urlsplit(spec).scheme
    return scheme in REMOTE_SCHEMES


def _open_zarr(target: str, storage_options: dict | None) -> xr.Dataset:
    # chunks={} keeps the storage chunking as the dask chunking: one task per stored chunk.
    # consolidated=None reads consolidated metadata where there is some (Zarr v2, remote
    # stores) and falls back quietly where there is none (Zarr v3 keeps one zarr.json per node).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to open Zarr store with consolidated")
        return xr.open_zarr(target, chunks={}, storage_options=storage_options, consolidated=None)


def _open_netcdf(target: str, storage_options: dict | None) -> xr.Dataset:
    if _is_remote(target):
        import fsspec

        handle = fsspec.open(target, mode="rb", **(storage_options or {})).open()
        ds = xr.open_dataset(handle, engine="h5netcdf", chunks={})
    else:
        ds = xr.open_dataset(target, engine="h5netcdf", chunks={})
    return _chunk_contiguous(ds)


def _chunk_contiguous(ds: xr.Dataset) -> xr.Dataset:
    """Unchunked (contiguous) variables get a balanced dask chunking, so blocks can be formed."""
    rechunk = {}
    for _name, var in ds.data_vars.items():
        if var.ndim == 3 and var.chunks is not None and all(len(c) == 1 for c in var.chunks):
            rechunk = {dim: math.ceil(size / 4) for dim, size in zip(var.dims, var.shape)}
            break
    return ds.chunk(rechunk) if rechunk else ds


def open_cube(spec: str | Path, storage_options: dict | None = None) -> xr.Dataset:
    """Open a cube as a lazy, dask-backed dataset with canonical ESDC names.

    `spec` is `synthetic:<preset>[?layout=..&seed=..&format=..&profile=..]` (generated once into
    the cache), a local Zarr v2/v3 directory or NetCDF file, or a remote URL (`s3://`,
    `https://`, ...) read through fsspec; `storage_options` go to fsspec (e.g. `anon=True`,
    `endpoint_url=...`).
    """
    spec = str(spec)
    if spec.startswith("synthetic:"):
        s = SyntheticSpec.parse(spec)
        path = make_cube(s.preset, s.seed, s.layout, s.zarr_format, s.profile)
        ds = _open_zarr(str(path), None)
        ds.attrs["cubebench_store"] = str(path)
    elif _is_remote(spec):
        opener = _open_netcdf if spec.lower().endswith(NETCDF_SUFFIXES) else _open_zarr
        try:
            ds = opener(spec, storage_options)
        except Exception as exc:  # any failure here is about the remote store or its options
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise CubeError(
                f"cannot open remote cube {spec}: {type(exc).__name__}: {reason}"
            ) from None
        ds.attrs["cubebench_store"] = spec
    else:
        path = Path(spec).expanduser()
        ds = _open_local(path, storage_options)
        ds.attrs["cubebench_store"] = str(path.resolve())
    ds = canonicalize(ds)
    if not any(set(DIMS) <= set(v.dims) for v in ds.data_vars.values()):
        found = ", ".join(f"{n}{tuple(map(str, v.dims))}" for n, v in ds.data_vars.items())
        raise CubeError(f"{spec} has no variable with dims {DIMS}; found: {found or 'none'}")
    ds.attrs.setdefault("cubebench_source", spec)
    return ds


def _open_local(path: Path, storage_options: dict | None) -> xr.Dataset:
    if not path.exists():
        raise CubeError(f"cube not found: {path}")
    try:
        if path.is_file():
            if path.suffix.lower() not in NETCDF_SUFFIXES:
                raise CubeError(f"{path} is a file but not NetCDF ({', '.join(NETCDF_SUFFIXES)})")
            return _open_netcdf(str(path), None)
        if not any((path / m).exists() for m in ("zarr.json", ".zgroup", ".zmetadata")):
            raise CubeError(f"{path} is not a Zarr store (no zarr.json or .zgroup)")
        return _open_zarr(str(path), storage_options)
    except PermissionError as exc:
        raise CubeError(f"permission denied reading {exc.filename or path}") from None
    except OSError as exc:
        raise CubeError(f"cannot read {path}: {exc.strerror or exc}") from None
