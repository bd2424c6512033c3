"""The per-chunk hot loop, compiled: gather, normalise, add coordinate features and shuffle in
one pass over the chunk while it is in cache.

Done with numpy, the same work takes ten array passes (isfinite, flatnonzero, a gather per
column, divmod for the coordinates, a permutation and a record gather) and costs about twice
the decode itself; fused, it costs less than the boolean indexing a bare reader does. The
kernels release the GIL, so the decode threads run them in parallel.

The shuffle is Durstenfeld's "inside-out" Fisher-Yates: each new record lands at a uniform
random position among those written so far and the one it displaces moves to the end, so the
permuted records are written once, without a separate permutation array. The random numbers
come from splitmix64 seeded per (seed, epoch, chunk): independent of threads and timing.
"""

from __future__ import annotations

import numba
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@numba.njit(nogil=True, cache=True, inline="always")
def _splitmix64(state: np.uint64) -> tuple[np.uint64, np.uint64]:
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return state, z ^ (z >> np.uint64(31))


@numba.njit(nogil=True, cache=True)
def fill_records(valid, arrays, mean, inv_std, coord_axis, coord_table, seed, shuffle, x, y):
    """Write the samples where `valid` into `x[n, F]`, `y[n]`.

    `arrays` are the inputs then the target; features are the normalised inputs, then the
    coordinate features `coord_table[c, index along coord_axis[c]]`. Without `shuffle` the
    samples keep the chunk's C order.
    """
    nt, ny, nx = valid.shape
    n_inputs = len(arrays) - 1
    n_coords = len(coord_axis)
    n_features = n_inputs + n_coords
    target = arrays[n_inputs]
    state = np.uint64(seed)
    position = np.zeros(3, np.int64)
    k = 0
    for t in range(nt):
        position[0] = t
        for j in range(ny):
            position[1] = j
            for i in range(nx):
                if not valid[t, j, i]:
                    continue
                slot = k
                if shuffle:
                    state, r = _splitmix64(state)
                    # uniform in [0, k]: the high 32 bits scaled (Lemire), bias < 2^-32 * k
                    slot = np.int64(((r >> np.uint64(32)) * np.uint64(k + 1)) >> np.uint64(32))
                    if slot != k:  # element-wise: a slice copy here costs twice as much
                        for c in range(n_features):
                            x[k, c] = x[slot, c]
                        y[k] = y[slot]
                position[2] = i
                for v in range(n_inputs):
                    x[slot, v] = (arrays[v][t, j, i] - mean[v]) * inv_std[v]
                for c in range(n_coords):
                    x[slot, n_inputs + c] = coord_table[c, position[coord_axis[c]]]
                y[slot] = (target[t, j, i] - mean[n_inputs]) * inv_std[n_inputs]
                k += 1


@numba.njit(nogil=True, cache=True)
def copy_runs(x, y, sources, lengths, targets, out_x, out_y) -> None:
    """out[targets[r] : targets[r] + lengths[r]] = x[sources[r] : sources[r] + lengths[r]]."""
    width = x.shape[1]
    flat_x, flat_out = x.reshape(-1), out_x.reshape(-1)  # 1-D copies: ~10x faster than 2-D
    for r in range(len(sources)):
        start, n, at = sources[r], lengths[r], targets[r]
        flat_out[at * width : (at + n) * width] = flat_x[start * width : (start + n) * width]
        out_y[at : at + n] = y[start : start + n]


def valid_mask(
    arrays: list[np.ndarray],
    selection: tuple[np.ndarray, np.ndarray, np.ndarray],
    part_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Where a chunk's sample is valid: finite in every array, selected on every axis
    (`selection`), and the part's (`part_mask`, None: every pixel is)."""
    valid = np.isfinite(arrays[0])
    for a in arrays[1:]:
        valid &= np.isfinite(a)
    st, sy, sx = selection
    if not (st.all() and sy.all() and sx.all()):
        valid &= st[:, None, None] & sy[None, :, None] & sx[None, None, :]
    if part_mask is not None:
        valid &= part_mask
    return valid


def chunk_records(
    arrays: list[np.ndarray],
    selection: tuple[np.ndarray, np.ndarray, np.ndarray],
    mean: np.ndarray,
    inv_std: np.ndarray,
    coord_axis: np.ndarray,
    coord_table: np.ndarray,
    seed: int | None,
    part_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """float32 `(X[n, F], y[n])` of one chunk's valid samples; shuffled when `seed` is given.

    A sample is valid where the pixel is selected (`selection`: a mask per axis; `part_mask`:
    the pixels of the part, for a chunk shared by parts) and every array is finite. The mask
    is built by numpy (SIMD; the kernel's loop is not vectorised).
    """
    valid = valid_mask(arrays, selection, part_mask)
    dtype = np.result_type(*arrays)
    arrays = tuple(np.ascontiguousarray(a, dtype=dtype) for a in arrays)
    n = int(np.count_nonzero(valid))
    x = np.empty((n, len(arrays) - 1 + len(coord_axis)), np.float32)
    y = np.empty(n, np.float32)
    fill_records(
        valid,
        arrays,
        mean,
        inv_std,
        coord_axis,
        coord_table,
        np.uint64(0 if seed is None else seed),
        seed is not None,
        x,
        y,
    )
    return x, y


def warm_up(n_arrays: int, dtype: np.dtype, n_coords: int) -> None:
    """Compile (or load from numba's cache) the kernels for these types, ahead of the first
    chunk: loading them takes ~0.4 s, once per process."""
    arrays = [np.zeros((1, 1, 1), dtype) for _ in range(n_arrays)]
    selection = (np.ones(1, bool),) * 3
    coords = np.zeros(n_coords, np.int64), np.zeros((n_coords, 1), np.float32)
    ones = np.ones(n_arrays, np.float32)
    x, y = chunk_records(arrays, selection, ones, ones, *coords, seed=1)
    runs = np.zeros(1, np.int64)
    copy_runs(x, y, runs, runs, runs, np.empty_like(x), np.empty_like(y))
