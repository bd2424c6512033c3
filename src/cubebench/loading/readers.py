"""Chunk readers behind one small interface, so the fastest one can be chosen on evidence.

Measured on this machine (`small` cube, one chunk of two variables, one thread): reading the
stored bytes and decoding them with the codec's numcodecs object (`DirectReader`) costs
0.35 ms; tensorstore 1.25 ms; zarr-python 3's default codec pipeline 2-3x tensorstore, the
`zarrs` pipeline in between. Per chunk those readers build an array machinery (index
transforms, futures, an event loop) that costs more than the decode itself. The loader
therefore prefers the direct reader for local Zarr v2/v3 stores whose codecs it knows (no
sharding, no filters), then tensorstore, and falls back to zarr-python (remote stores, where
fsspec handles credentials) and to xarray's backend (NetCDF and anything else).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
        threads: int | None = None,
    ):
        self.store = store
        self.threads = threads  # a reader with its own pool uses no more (tensorstore)
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
            context = None
            if self.threads:  # its pools: no more cores than the loader's threads
                limit = {"limit": self.threads}
                context = ts.Context({"data_copy_concurrency": limit, "file_io_concurrency": limit})
            self._arrays[key] = ts.open(spec, read=True, context=context).result()
        return self._arrays[key]

    def read(self, var: str, window: Window) -> np.ndarray:
        return self._decoded(var, self._array(var)[window].read().result())

    def read_many(self, names: Sequence[str], window: Window) -> list[np.ndarray]:
        reads = [self._array(v)[window].read() for v in names]  # all in flight at once
        return [self._decoded(v, r.result()) for v, r in zip(names, reads)]


class DirectReader(_OneByOne, _ZarrBase):
    """A local Zarr v2/v3 store read file by file: the chunk's stored bytes, decoded by the
    codec's numcodecs object straight into the output array. No index transforms, futures or
    event loop per chunk: what is left is the irreducible work (a file read and a decode),
    which is why `bench-loader` uses it for the reference."""

    name = "direct"

    def _layout(self, var: str) -> _DirectLayout:
        key = ("direct", var)
        if key not in self._arrays:
            layout = _direct_layout(os.path.join(self.store, self.stored_names.get(var, var)))
            if layout is None:
                raise ValueError(f"{var}: not a Zarr array the direct reader decodes")
            self._arrays[key] = layout
        return self._arrays[key]

    def read(self, var: str, window: Window) -> np.ndarray:
        layout = self._layout(var)
        starts = [w.start // c for w, c in zip(window, layout.chunks)]
        stops = [-(-w.stop // c) for w, c in zip(window, layout.chunks)]
        if all(b - a == 1 for a, b in zip(starts, stops)):  # one chunk: the usual case
            whole = layout.decode(tuple(starts))
            local = tuple(
                slice(w.start - a * c, w.stop - a * c)
                for w, a, c in zip(window, starts, layout.chunks)
            )
            return self._decoded(var, whole[local])
        out = np.empty([w.stop - w.start for w in window], layout.dtype)
        for index in np.ndindex(*(b - a for a, b in zip(starts, stops))):
            chunk = tuple(a + i for a, i in zip(starts, index))
            lo = [max(w.start, k * c) for w, k, c in zip(window, chunk, layout.chunks)]
            hi = [min(w.stop, (k + 1) * c) for w, k, c in zip(window, chunk, layout.chunks)]
            source = tuple(
                slice(a - k * c, b - k * c) for a, b, k, c in zip(lo, hi, chunk, layout.chunks)
            )
            target = tuple(slice(a - w.start, b - w.start) for a, b, w in zip(lo, hi, window))
            out[target] = layout.decode(chunk)[source]
        return self._decoded(var, out)


@dataclass(frozen=True)
class _DirectLayout:
    """What the direct reader needs of one array: where its chunk files are and how to decode
    one."""

    path: str
    chunks: tuple[int, ...]
    dtype: np.dtype
    fill_value: object
    codec: object  # a numcodecs codec (decode(buf, out=...))
    key: Callable[[tuple[int, ...]], str]

    def decode(self, chunk: tuple[int, ...]) -> np.ndarray:
        """The whole stored chunk (edge chunks are stored whole too), native byte order."""
        out = np.empty(self.chunks, self.dtype)
        try:
            with open(os.path.join(self.path, self.key(chunk)), "rb") as f:
                data = f.read()
        except FileNotFoundError:  # never written: the fill value
            out.fill(self.fill_value)
        else:
            if getattr(self.codec, "codec_id", None) == "blosc":
                _check_blosc(data, out.nbytes)
            decoded = self.codec.decode(data, out=out)
            if decoded is not out:  # a codec that ignores `out`
                out[...] = np.frombuffer(decoded, self.dtype).reshape(self.chunks)
        return out if self.dtype.isnative else out.astype(self.dtype.newbyteorder("="))


def _check_blosc(data: bytes, nbytes: int) -> None:
    """A blosc buffer whose header disagrees with its length or the chunk's size: blosc may
    decode a truncated buffer past its end without an error (undefined), so say it here."""
    if len(data) < 16:
        raise ValueError(f"blosc buffer of {len(data)} bytes: shorter than its header")
    size, stored = int.from_bytes(data[4:8], "little"), int.from_bytes(data[12:16], "little")
    if stored != len(data) or size != nbytes:
        raise ValueError(
            f"blosc buffer of {len(data)} bytes; its header says {stored} bytes holding {size}, "
            f"the chunk is {nbytes}: truncated or corrupt"
        )


def _direct_layout(path: str) -> _DirectLayout | None:
    """The array's chunk files and codec when the direct reader can decode them, else None:
    one compressor (numcodecs) and no filters, sharding or transposition; C order."""
    import numcodecs

    try:
        if os.path.exists(os.path.join(path, "zarr.json")):
            with open(os.path.join(path, "zarr.json")) as f:
                meta = json.load(f)
            grid, encoding = meta["chunk_grid"], meta["chunk_key_encoding"]
            if grid["name"] != "regular" or meta.get("storage_transformers"):
                return None
            chunks = tuple(grid["configuration"]["chunk_shape"])
            codecs = meta["codecs"]
            if not codecs or codecs[0]["name"] != "bytes" or len(codecs) > 2:
                return None
            endian = codecs[0].get("configuration", {}).get("endian", "little")
            dtype = np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")
            codec = _v3_codec(codecs[1]) if len(codecs) == 2 else _Raw()
            if encoding["name"] not in ("default", "v2"):
                return None
            default = "/" if encoding["name"] == "default" else "."
            separator = encoding.get("configuration", {}).get("separator", default)
            prefix = "c" + separator if encoding["name"] == "default" else ""
            fill = meta["fill_value"]
        else:
            with open(os.path.join(path, ".zarray")) as f:
                meta = json.load(f)
            if meta.get("filters") or meta.get("order", "C") != "C":
                return None
            chunks, dtype = tuple(meta["chunks"]), np.dtype(meta["dtype"])
            compressor = meta.get("compressor")
            codec = numcodecs.get_codec(compressor) if compressor else _Raw()
            separator, prefix = meta.get("dimension_separator") or ".", ""
            fill = meta.get("fill_value")
    except (OSError, KeyError, ValueError, TypeError):
        return None
    if codec is None or dtype.kind not in "fiub":
        return None
    fill = np.nan if fill in (None, "NaN") and dtype.kind == "f" else fill
    fill = (
        {"Infinity": np.inf, "-Infinity": -np.inf}.get(fill, fill)
        if isinstance(fill, str)
        else fill
    )
    if fill is None or isinstance(fill, str):
        return None  # base64 or otherwise encoded fill values: leave them to zarr

    def key(chunk: tuple[int, ...]) -> str:
        return prefix + separator.join(map(str, chunk))

    return _DirectLayout(path, chunks, dtype, fill, codec, key)


class _Raw:
    """No compressor: the stored bytes are the chunk."""

    def decode(self, buf: bytes, out: np.ndarray) -> np.ndarray:
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(buf, np.uint8)
        return out


def _v3_codec(spec: dict):
    """The numcodecs object of a Zarr v3 bytes-to-bytes codec, None for one it does not know."""
    import numcodecs

    name, config = spec["name"], spec.get("configuration", {})
    if name == "blosc":
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[
            config.get("shuffle", "noshuffle")
        ]
        return numcodecs.Blosc(
            cname=config["cname"],
            clevel=config["clevel"],
            shuffle=shuffle,
            blocksize=config.get("blocksize", 0),
        )
    if name == "zstd":
        return numcodecs.Zstd(level=config.get("level", 0))
    if name == "gzip":
        return numcodecs.GZip(level=config.get("level", 5))
    return None


def _direct_readable(ds: xr.Dataset, store: str) -> bool:
    names = _stored_names(ds)
    return all(
        _direct_layout(os.path.join(store, names.get(str(v), str(v)))) is not None
        for v in ds.data_vars
    )


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
        if _direct_readable(ds, store):
            names.append("direct")
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
    ds: xr.Dataset,
    name: str | None = None,
    storage_options: dict | None = None,
    threads: int | None = None,
) -> ChunkReader:
    """A reader for the cube: `name`, or the fastest available one; one with its own thread
    pool is limited to `threads`."""
    names = available_readers(ds)
    name = name or names[0]
    if name not in names:
        from cubebench.errors import CubebenchError

        raise CubebenchError(f"reader {name!r} cannot read this cube here; available: {names}")
    if name == "xarray":
        return XarrayReader(ds)
    cls = {
        "direct": DirectReader,
        "zarr": ZarrReader,
        "zarrs": ZarrsReader,
        "tensorstore": TensorstoreReader,
    }[name]
    store = ds.attrs["cubebench_store"]
    return cls(store, _stored_names(ds), storage_options, cf_encodings(ds), threads)
