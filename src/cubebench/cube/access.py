"""`open_cube(spec)`: one entry point for synthetic, local and remote cubes."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import xarray as xr

from cubebench.cluster import parse_local
from cubebench.cube.schema import DIMS, PROFILES, canonicalize
from cubebench.cube.synthetic import (
    GENERATOR_VERSION,
    PRESETS,
    build_dataset,
    cache_dir,
    layout_chunks,
    write_cube,
)
from cubebench.errors import CubeError
from cubebench.locks import file_lock

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

    SEED_MAX = 2**32 - 1  # the generator hashes seed * 3 + 1 into 64 bits

    def __post_init__(self) -> None:
        # checked before anything is written: the fields also name the cached cube's directory
        if not isinstance(self.preset, str) or self.preset not in PRESETS:
            raise CubeError(f"unknown preset {self.preset!r}; use one of {', '.join(PRESETS)}")
        if not isinstance(self.profile, str) or self.profile not in PROFILES:
            raise CubeError(f"unknown profile {self.profile!r}; use one of {', '.join(PROFILES)}")
        if not isinstance(self.layout, str):
            raise CubeError(f"a layout is a name or 't,y,x', got {self.layout!r}")
        layout_chunks(self.layout, PRESETS[self.preset].shape)  # a CubeError when bad
        if "," in self.layout:  # one cache entry per chunk shape, however it was typed
            chunks = ",".join(str(int(v)) for v in self.layout.split(","))
            object.__setattr__(self, "layout", chunks)
        if self.zarr_format not in (2, 3) or isinstance(self.zarr_format, bool):
            raise CubeError(f"zarr format must be 2 or 3, got {self.zarr_format!r}")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= self.SEED_MAX:
            raise CubeError(f"a cube seed is an integer from 0 to {self.SEED_MAX}, got {seed!r}")

    @classmethod
    def parse(cls, spec: str) -> SyntheticSpec:
        body = spec.removeprefix("synthetic:")
        preset, _, query = body.partition("?")
        options = dict(parse_qsl(query, keep_blank_values=True))
        known = {"layout", "seed", "format", "profile"}
        unknown = set(options) - known
        if unknown:
            raise CubeError(
                f"unknown option(s) {sorted(unknown)} in {spec!r}; "
                f"known: {', '.join(sorted(known))}"
            )
        try:
            seed = int(options.get("seed", 0))
            zarr_format = int(options.get("format", 3))
        except ValueError:
            raise CubeError(f"bad number in {spec!r}: seed and format are integers") from None
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
    scheduler: str | None = None,
) -> Path:
    """Write a synthetic cube (to `output`, or once into the cache) and return its path.

    `scheduler` (see `cubebench.cluster`): where the chunks are computed and written; workers
    of a remote scheduler must see the output path. The values do not depend on it.
    """
    spec = SyntheticSpec(preset, layout, seed, zarr_format, profile)
    if scheduler is not None:
        parse_local(scheduler)  # a bad `local:N` fails before the land mask is computed
    if output is None:  # the shared cache: two suites starting at once generate it once
        path = cache_dir() / spec.cache_name
        if path.exists():  # written by rename: present means complete (the cache may be read-only)
            return path
        with file_lock(path.parent / f".{path.name}.lock"):
            if not path.exists():
                ds = build_dataset(preset=preset, seed=seed, layout=layout, profile=profile)
                write_cube(ds, path, zarr_format, scheduler=scheduler)
        return path
    path = Path(output)
    if path.exists() and not overwrite:
        raise CubeError(f"{path} exists; pass --force to overwrite it")
    ds = build_dataset(preset=preset, seed=seed, layout=layout, profile=profile)
    return write_cube(ds, path, zarr_format, scheduler=scheduler)


def _is_remote(spec: str) -> bool:
    scheme = urlsplit(spec).scheme
    return scheme in REMOTE_SCHEMES


# numcodecs codecs whose decode runs code that the store supplies: `pickle` unpickles each chunk
CODE_RUNNING_CODECS = frozenset({"pickle"})


def refuse_code_running_codecs(target: str, storage_options: dict | None = None) -> None:
    """Raise a CubeError when an array of the Zarr store at `target` decodes by running code.

    A cube is untrusted data (a shared bucket, a download): opening it and decoding its chunks
    must never execute anything it contains. numcodecs' `pickle` codec (a v2 filter, compressor
    or object codec of an object-dtype array; `numcodecs.pickle` in v3) calls `pickle.loads` on
    every chunk, which runs whatever the chunk holds. zarr-python 3.1 happens not to decode it
    (it fails with a ValueError deep in its metadata parsing), but zarr 2, other readers and
    later versions may, so the metadata (consolidated or per array) is read as plain JSON here
    and checked before xarray, zarr or a chunk reader sees the store.
    """
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(target, **(storage_options or {}))
    except Exception:  # bad options: the opener says so, in its own words
        return
    root = root.rstrip("/")
    arrays: dict[str, dict] = {}  # "name (where)" -> array metadata
    top = _cat_json(fs, [f"{root}/.zmetadata", f"{root}/zarr.json"])
    v2 = (top.get(f"{root}/.zmetadata") or {}).get("metadata") or {}
    v3 = ((top.get(f"{root}/zarr.json") or {}).get("consolidated_metadata") or {}).get(
        "metadata"
    ) or {}
    names = set()
    if isinstance(v2, dict):
        for key, meta in v2.items():
            if str(key).endswith(".zarray"):
                name = str(key).removesuffix(".zarray").rstrip("/") or "/"
                arrays[f"{name} (.zmetadata)"] = meta
                names.add(name)
    if isinstance(v3, dict):
        for name, meta in v3.items():
            arrays[f"{name} (consolidated zarr.json)"] = meta
            names.add(str(name))
    # the arrays' own metadata, which a reader may use instead of the consolidated copy;
    # without a listing (plain HTTP) the consolidated names only
    with contextlib.suppress(Exception):
        names |= {str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    per_array = [f"{root}/{n}/{m}" for n in sorted(names) for m in (".zarray", "zarr.json")]
    for path, meta in _cat_json(fs, per_array).items():
        arrays[path.removeprefix(root + "/")] = meta
    for where, meta in arrays.items():
        codec = _code_running_codec(meta)
        if codec:
            name = where.split(" ", 1)[0].split("/", 1)[0]
            raise CubeError(
                f"{target}: variable {name!r} uses the {codec!r} codec, which runs code stored "
                "in the cube while decoding (pickle.loads): refusing to open it"
            )


def _cat_json(fs, paths: list[str]) -> dict[str, dict]:
    """{path: JSON object} of the `paths` that exist and hold a JSON object."""
    if not paths:
        return {}
    try:  # whole files, concurrently on async filesystems; names are not globs here
        raw = fs.cat_ranges(paths, None, None, on_error="return")
    except Exception:
        return {}
    out = {}
    for path, data in zip(paths, raw):
        try:
            doc = json.loads(data)
        except (ValueError, TypeError):  # missing (an exception returned), or not JSON
            continue
        if isinstance(doc, dict):
            out[str(path)] = doc
    return out


def _code_running_codec(meta: object) -> str | None:
    """The first codec of an array's metadata (Zarr v2 or v3) in CODE_RUNNING_CODECS."""
    if not isinstance(meta, dict):
        return None
    codecs: list = []
    filters = meta.get("filters")
    codecs += filters if isinstance(filters, list) else []
    codecs.append(meta.get("compressor"))
    stack = list(meta.get("codecs") or []) if isinstance(meta.get("codecs"), list) else []
    while stack:  # v3 codecs, sharding's inner and index codecs included
        codec = stack.pop()
        codecs.append(codec)
        config = codec.get("configuration") if isinstance(codec, dict) else None
        if isinstance(config, dict):
            for key in ("codecs", "index_codecs"):
                if isinstance(config.get(key), list):
                    stack += config[key]
    for codec in codecs:
        if isinstance(codec, dict):
            ident = codec.get("id", codec.get("name"))
            if isinstance(ident, str) and ident.removeprefix("numcodecs.") in CODE_RUNNING_CODECS:
                return ident
    return None


def _open_zarr(target: str, storage_options: dict | None) -> xr.Dataset:
    refuse_code_running_codecs(target, storage_options)
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
        except CubeError:
            raise
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
    except CubeError:
        raise
    except Exception as exc:  # metadata the readers reject: broken JSON, an unknown codec...
        reason = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise CubeError(f"cannot open {path}: {type(exc).__name__}: {reason}") from None
