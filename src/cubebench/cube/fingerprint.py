"""A stable identity for a cube, recorded with every result."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import xarray as xr

SAMPLED_CHUNKS = 3  # first, middle and last chunk of every data variable


def _chunk_slices(var: xr.DataArray, index: int) -> dict[str, slice]:
    """The index-th chunk (counted in C order over the chunk grid) of a dask-backed variable."""
    grid = [len(c) for c in var.chunks]
    position = np.unravel_index(index, grid)
    slices = {}
    for dim, chunks, i in zip(var.dims, var.chunks, position):
        start = int(sum(chunks[:i]))
        slices[str(dim)] = slice(start, start + chunks[i])
    return slices


def cube_fingerprint(ds: xr.Dataset) -> str:
    """Hash of the schema (names, dims, shapes, dtypes, chunking, units, coordinates) and of a
    sample of chunk contents: equal cubes match, a changed value in a sampled chunk, a new
    chunking or a renamed variable do not. Reads only a few chunks."""
    h = hashlib.sha256()
    schema = {
        "dims": {str(k): int(v) for k, v in sorted(ds.sizes.items())},
        "vars": {
            str(name): {
                "dims": list(map(str, var.dims)),
                "dtype": str(var.dtype),
                "chunks": [list(c) for c in var.chunks] if var.chunks else None,
                "units": str(var.attrs.get("units", "")),
            }
            for name, var in sorted(ds.data_vars.items())
        },
    }
    h.update(json.dumps(schema, sort_keys=True).encode())
    for name in sorted(ds.coords):
        h.update(str(name).encode())
        h.update(np.ascontiguousarray(ds[name].values).tobytes())
    for _, var in sorted(ds.data_vars.items()):
        if var.chunks is None:
            h.update(np.ascontiguousarray(var.values).tobytes())
            continue
        n = int(np.prod([len(c) for c in var.chunks]))
        for index in sorted({0, n // 2, n - 1}):
            block = var.isel(_chunk_slices(var, index)).values
            h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()[:16]
