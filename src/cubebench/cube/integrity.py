"""Naming the chunk that cannot be read: a corrupted store must cost one sentence, not a hunt.

Decoders fail deep inside dask or a codec ("error during blosc decompression: -1") with no word
of which array or chunk. These helpers run on the error path only: they re-read the suspect
chunks one at a time and raise a `ChunkReadError` naming the variable and the store key.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence

import numpy as np
import xarray as xr

from cubebench.errors import ChunkReadError

ChunkIndex = tuple[int, int, int]


def chunk_key(ds: xr.Dataset, var: str, index: Sequence[int]) -> str:
    """The store key of one chunk (`c/0/4/1` in Zarr v3, `0.4.1` in v2), else its index."""
    store = ds.attrs.get("cubebench_store")
    if store:
        try:
            import zarr

            stored = json.loads(ds.attrs.get("cubebench_stored_names", "{}")).get(var, var)
            array = zarr.open_array(store, path=stored, mode="r")
            return str(array.metadata.encode_chunk_key(tuple(int(i) for i in index)))
        except Exception:  # not Zarr (NetCDF), or unreachable: the index still says where
            pass
    return "index " + ",".join(str(int(i)) for i in index)


def chunk_error(
    ds: xr.Dataset,
    var: str,
    index: Sequence[int],
    error: BaseException,
    key_of: str | None = None,
) -> str:
    """One line naming `var` (or several, "a/b") and the chunk's store key (that of `key_of`:
    variables on one grid share their keys)."""
    where = ds.attrs.get("cubebench_source") or ds.attrs.get("cubebench_store") or "the cube"
    reason = str(error).splitlines()[0][:200] if str(error) else ""
    return (
        f"cannot read {var!r} chunk {chunk_key(ds, key_of or var, index)} of {where}: "
        f"{type(error).__name__}: {reason}"
    )


def _chunks_of(var: xr.DataArray, windows: Iterable[Sequence[slice]]) -> list[ChunkIndex]:
    edges = [np.concatenate([[0], np.cumsum(c)]) for c in var.chunks]
    found: set[ChunkIndex] = set()
    for window in windows:
        ranges = [
            range(int(np.searchsorted(e, w.start, "right")) - 1, int(np.searchsorted(e, w.stop)))
            for e, w in zip(edges, window)
        ]
        found.update(itertools.product(*ranges))  # type: ignore[arg-type]
    return sorted(found)


def raise_unreadable_chunk(
    ds: xr.Dataset, variables: Sequence[str], windows: Iterable[Sequence[slice]] | None = None
) -> None:
    """Read every chunk of `variables` inside `windows` (all chunks by default) one by one and
    raise `ChunkReadError` for the first that fails; return quietly if all can be read."""
    windows = list(windows) if windows is not None else None
    for var in variables:
        data = ds[var]
        if data.chunks is None:
            continue
        if windows is None:
            chunks = list(itertools.product(*(range(len(c)) for c in data.chunks)))
        else:
            chunks = _chunks_of(data, windows)
        for index in chunks:
            try:
                np.asarray(data.data.blocks[index])
            except Exception as error:
                raise ChunkReadError(chunk_error(ds, var, index, error)) from None
