"""Chunk readers behind one small interface, so the fastest one can be chosen on evidence.

Measured on this machine (`small` cube, decode-and-mask of every chunk of two variables,
2 threads; see `cubebench bench-loader`): tensorstore decodes 2-3x faster than zarr-python 3's
default codec pipeline, with the `zarrs` pipeline in between. The loader therefore prefers
tensorstore for local Zarr stores and falls back to zarr-python (remote stores, where fsspec
handles credentials) and to xarray's backend (NetCDF and anything else).

Readers are picklable: they hold only addresses and open their handles lazily in each process
(torch DataLoader workers are spawned).

The Zarr readers return what is stored; where the cube's CF encoding changes values
(`_FillValue` / `missing_value` other than NaN, int packing with `scale_factor` /
`add_offset`), they decode it as xarray did when it opened the cube, so every reader delivers
the values of the reference definition: a -9999 fill is missing, never -9999 K.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import xarray as xr

Window = tuple[slice, slice, slice]


class ChunkReader(Protocol):
    name: str

    def read(self, var: str, window: Window) -> np.ndarray:
        """Decoded values of `var` on a window (one chunk, normally)."""
        ...

    def read_many(self, names: Sequence[str], window: Window) -> list[np.ndarray]:
        """Several variables on one window (readers with async I/O read them concurrently)."""
        ...

    def stored_nbytes(self, var: str, chunk_index: tuple[int, int, int]) -> int | None:
        """Compressed bytes of one stored chunk (0 when the chunk is absent), None if unknown."""
        ...


class _OneByOne:
    def read_many(self, names: Sequence[str], window: Window) -> list[np.ndarray]:
        return [self.read(v, window) for v in names]


def _stored_names(ds: xr.Dataset) -> dict[str, str]:
    return json.loads(ds.attrs.get("cubebench_stored_names", "{}"))


_CF_KEYS = ("_FillValue", "missing_value", "scale_factor", "add_offset", "_Unsigned")


def cf_encodings(ds: xr.Dataset) -> dict[str, dict]:
    """Per variable, the CF attributes xarray decoded it with, where decoding changes values.

    A NaN `_FillValue` on a float variable changes nothing (a raw NaN is already missing), so
    the common float cube needs no decoding at all.
    """
    out: dict[str, dict] = {}
    for name, var in ds.data_vars.items():
        attrs = {k: var.encoding[k] for k in _CF_KEYS if k in var.encoding}
        fills = [attrs[k] for k in ("_FillValue", "missing_value") if k in attrs]
        scaled = any(k in attrs for k in ("scale_factor", "add_offset", "_Unsigned"))
        if scaled or any(not np.isnan(np.asarray(f, np.float64)).all() for f in fills):
            out[str(name)] = attrs
    return out


def cf_decode(var: str, raw: np.ndarray, attrs: dict) -> np.ndarray:
    """Stored values -> what xarray shows (fill values -> NaN, unpacked): xarray's own coders."""
    from xarray.conventions import decode_cf_variable

    stored = xr.Variable(tuple(f"d{i}" for i in range(raw.ndim)), raw, attrs=dict(attrs))
    decoded = decode_cf_variable(var, stored, decode_times=False, decode_timedelta=False)
    return np.asarray(decoded.values)


def _is_local_zarr(store: str) -> bool:
    return os.path.isdir(store) and any(
        os.path.exists(os.path.join(store, m)) for m in ("zarr.json", ".zgroup", ".zmetadata")
    )


class _ZarrBase:
    """Shared by readers that address a Zarr store directly."""

    def __init__(
        self,
        store: str,
        stored_names: dict[str, str],
        storage_options: dict | None,
        cf: dict[str, dict] | None = None,
    ):
        self.store = store
        self.stored_names = stored_names
        self.storage_options = storage_options
        self.cf = cf or {}  # variable -> CF attributes to decode with (`cf_encodings`)
        self._arrays: dict = {}
        self._sizes: dict[str, dict[str, int]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}, "_sizes": {}}

    def _decoded(self, var: str, raw: np.ndarray) -> np.ndarray:
        attrs = self.cf.get(var)
        return raw if attrs is None else cf_decode(var, raw, attrs)

    def _zarr_array(self, var: str):
        import zarr

        key = ("zarr", var)
        if key not in self._arrays:
            self._arrays[key] = zarr.open_array(
                self.store,
                path=self.stored_names.get(var, var),
                mode="r",
                storage_options=self.storage_options if "://" in self.store else None,
            )
        return self._arrays[key]

    def stored_nbytes(self, var: str, chunk_index: tuple[int, int, int]) -> int | None:
        if var not in self._sizes:
            import fsspec

            fs, root = fsspec.core.url_to_fs(self.store, **(self.storage_options or {}))
            prefix = f"{root.rstrip('/')}/{self.stored_names.get(var, var)}/"
            listing = fs.find(prefix, detail=True)
            self._sizes[var] = {p[len(prefix) :]: int(i["size"]) for p, i in listing.items()}
        key = self._zarr_array(var).metadata.encode_chunk_key(tuple(chunk_index))
        return self._sizes[var].get(key, 0)


class ZarrReader(_ZarrBase):
    """zarr-python with its default codec pipeline: works for every Zarr store fsspec reaches."""

    name = "zarr"

    def read(self, var: str, window: Window) -> np.ndarray:
        return self._decoded(var, np.asarray(self._zarr_array(var)[window]))

    def read_many(self, names: Sequence[str], window: Window) -> list[np.ndarray]:
        """The variables' requests in flight together on zarr's event loop: on a remote store a
        chunk costs one round trip, not one per variable."""
        if len(names) < 2:
            return [self.read(v, window) for v in names]
        import asyncio

        from zarr.core.sync import sync

        arrays = [self._zarr_array(v).async_array for v in names]

        async def gather() -> list:
            return await asyncio.gather(*(a.getitem(window) for a in arrays))

        return [self._decoded(v, np.asarray(r)) for v, r in zip(names, sync(gather()))]


class ZarrsReader(_OneByOne, _ZarrBase):
    """zarr-python with the Rust `zarrs` codec pipeline (PyPI `zarrs`)."""

    name = "zarrs"

    def read(self, var: str, window: Window) -> np.ndarray:
        import zarr

        key = ("zarrs", var)
        if key not in self._arrays:
            with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
                self._arrays[key] = zarr.open_array(
                    self.store, path=self.stored_names.get(var, var), mode="r"
                )
        return self._decoded(var, np.asarray(self._arrays[key][window]))


class TensorstoreReader(_ZarrBase):
    """Google's tensorstore on a local Zarr v2/v3 store: the fastest decoder measured here."""

    name = "tensorstore"

    def _array(self, var: str):
        key = ("ts", var)
        if key not in self._arrays:
            import tensorstore as ts

            path = os.path.join(self.store, self.stored_names.get(var, var))
            driver = "zarr3" if os.path.exists(os.path.join(path, "zarr.json")) else "zarr"
            spec = {"driver": driver, "kvstore": {"driver": "file", "path": path}}
            self._arrays[key] = ts.open(spec, read=True).result()
        return self._arrays[key]

    def read(self, var: str, window: Window) -> np.ndarray:
        return self._decoded(var, self._array(var)[window].read().result())

    def read_many(self, names: Sequence[str], window: Window) -> list[np.ndarray]:
        reads = [self._array(v)[window].read() for v in names]  # all in flight at once
        return [self._decoded(v, r.result()) for v, r in zip(names, reads)]


class XarrayReader(_OneByOne):
    """Any cube xarray opens (NetCDF, remote NetCDF...): reads through the backend, no dask."""

    name = "xarray"

    def __init__(self, ds: xr.Dataset):
        self.ds = ds

    def read(self, var: str, window: Window) -> np.ndarray:
        return np.asarray(self.ds[var].variable[window].values)

    def stored_nbytes(self, var: str, chunk_index: tuple[int, int, int]) -> int | None:
        return None


def available_readers(ds: xr.Dataset) -> list[str]:
    """Readers that can read this cube here, fastest first (by the measurements above)."""
    store = ds.attrs.get("cubebench_store", "")
    names = []
    if _is_local_zarr(store):
        if importlib.util.find_spec("tensorstore"):
            names.append("tensorstore")
        if importlib.util.find_spec("zarrs"):
            names.append("zarrs")
        names.append("zarr")
    elif "://" in store and not store.lower().endswith((".nc", ".nc4", ".h5")):
        names.append("zarr")
    names.append("xarray")
    return names


def open_reader(
    ds: xr.Dataset, name: str | None = None, storage_options: dict | None = None
) -> ChunkReader:
    """A reader for the cube: `name`, or the fastest available one."""
    names = available_readers(ds)
    name = name or names[0]
    if name not in names:
        from cubebench.errors import CubebenchError

        raise CubebenchError(f"reader {name!r} cannot read this cube here; available: {names}")
    if name == "xarray":
        return XarrayReader(ds)
    cls = {"zarr": ZarrReader, "zarrs": ZarrsReader, "tensorstore": TensorstoreReader}[name]
    return cls(ds.attrs["cubebench_store"], _stored_names(ds), storage_options, cf_encodings(ds))
