"""Patch geometry: windows of t x h x w pixels cut from the cube, and the gaps to fill in them.

A spatial task (LST gap-filling) samples **windows** on a regular grid (origin 0, a stride per
axis) instead of pixels. Windows keep the split's promise: a window lies in the blocks of one
part only (blocks without valid samples are neutral context); a window that touches blocks of
two parts is dropped and counted. A window is kept only if it holds at least one pixel to
predict.

The pixels to predict are **hidden**: a seeded mask of `gap_size`-pixel squares, a pure
function of (seed, global index) like the synthetic cube's noise, on top of the real gaps. So
every library, every chunking and every loader hides the same pixels.

Counting a window's target pixels reads the cube: it is done per block in the task's single
dask pass (`cell_counts`), on cells of `stride` pixels; a window is a whole number of cells.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cubebench.errors import TaskError
from cubebench.hashing import splitmix64

Triple = tuple[int, int, int]
GAP_KEY = 0x6761_7066_696C_6C21  # "gapfill!": keeps the gap hash apart from other hashes


def _positive_triple(value: object, name: str) -> Triple:
    ok = (
        isinstance(value, tuple)
        and len(value) == 3
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
        and min(value) >= 1
    )
    if not ok:
        raise TaskError(f"{name} must be 3 positive integers (t, h, w), got {value!r}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


@dataclass(frozen=True)
class Patch:
    """Windows of `size` (t, h, w) every `stride` pixels (default: `size`, no overlap), and
    the artificial gaps: `gap_fraction` of the `gap_size` x `gap_size` squares of every
    time step are hidden."""

    size: Triple = (1, 16, 16)
    stride: Triple | None = None
    gap_fraction: float = 0.25
    gap_size: int = 4

    def __post_init__(self) -> None:
        for name in ("size", "stride"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    @property
    def step(self) -> Triple:
        return self.size if self.stride is None else self.stride

    def validate(self) -> None:
        size = _positive_triple(self.size, "patch size")
        step = _positive_triple(self.step, "patch stride")
        if any(s % k for s, k in zip(size, step)):
            raise TaskError(
                f"a patch stride must divide the patch size on every axis, got size {size} "
                f"and stride {step}"
            )
        g = self.gap_fraction
        if isinstance(g, bool) or not isinstance(g, numbers.Real) or not 0 < float(g) < 1:
            raise TaskError(f"gap_fraction must be a number in (0, 1), got {g!r}")
        k = self.gap_size
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise TaskError(f"gap_size must be a positive integer, got {k!r}")

    @classmethod
    def parse(cls, text: str) -> Patch:
        """`"t,h,w"` or `"t,h,w/st,sh,sw"` (size, then an optional stride)."""
        size_text, _, stride_text = text.partition("/")

        def triple(part: str) -> tuple[int, ...]:
            try:
                return tuple(int(v) for v in part.split(","))
            except ValueError:
                raise TaskError(
                    f"a patch is 't,h,w' or 't,h,w/st,sh,sw' in pixels, got {text!r}"
                ) from None

        return cls(triple(size_text), triple(stride_text) if stride_text else None)  # type: ignore[arg-type]


def hidden_mask(patch: Patch, seed: int, ts: slice, ys: slice, xs: slice) -> np.ndarray:
    """The artificial gaps on a window of the grid: True where a pixel is hidden.

    A square of `gap_size` pixels (per time step) is hidden when a hash of (seed, t, square)
    falls below `gap_fraction`: independent of chunking, loader and library.
    """
    g = patch.gap_size
    t = np.arange(ts.start, ts.stop, dtype=np.uint64)
    # hashed once per square, then spread over its pixels (g² times fewer hashes)
    first_y, first_x = ys.start // g, xs.start // g
    cy = np.arange(first_y, (ys.stop - 1) // g + 1, dtype=np.uint64)
    cx = np.arange(first_x, (xs.stop - 1) // g + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        key = splitmix64(np.uint64(GAP_KEY) ^ np.uint64(seed & 0xFFFF_FFFF_FFFF_FFFF))
        h = splitmix64(key ^ t)[:, None, None]
        h = splitmix64(h ^ cy[None, :, None])
        h = splitmix64(h ^ cx[None, None, :])
    squares = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53 < patch.gap_fraction
    row = np.arange(ys.start, ys.stop) // g - first_y
    col = np.arange(xs.start, xs.stop) // g - first_x
    return squares[:, row][:, :, col]


def cell_counts(
    targets: np.ndarray, origin: Sequence[int], step: Triple
) -> tuple[Triple, np.ndarray]:
    """Per cell of `step` pixels, how many `targets` pixels (a block's boolean mask) it holds.

    Returns the block's first cell index and the counts; a cell cut by a block border gets
    its share here and the rest from the neighbouring block.
    """
    counts = targets.astype(np.int64)
    first = []
    for axis, (start, k) in enumerate(zip(origin, step)):
        n = counts.shape[axis]
        index = np.arange(int(start), int(start) + n)
        cuts = np.flatnonzero((index % k == 0) | (np.arange(n) == 0))
        counts = np.add.reduceat(counts, cuts, axis=axis) if n else counts
        first.append(int(start) // k)
    return tuple(first), counts  # type: ignore[return-value]


@dataclass(frozen=True)
class Windows:
    """Windows of every part (origins in pixels, C order) and what was left out."""

    origins: dict[str, np.ndarray]  # part -> (k, 3) int64
    targets: dict[str, int]  # part -> pixels to predict over its windows
    dropped_across_parts: int  # touch blocks of two parts (would leak) and hold targets
    without_targets: int  # in one part's blocks, no pixel to predict (ocean, clouds...)


def place_windows(
    patch: Patch,
    shape: Triple,
    block_edges: Sequence[np.ndarray],
    part_of_block: np.ndarray,
    parts: Sequence[str],
    cells: np.ndarray,
) -> Windows:
    """Every window of the grid, assigned to the part of the blocks it touches.

    `part_of_block` has the block grid's shape: the index of the block's part in `parts`, or
    -1 for a block in no part. `cells` are the target-pixel counts per cell (`cell_counts`
    summed over blocks).
    """
    size, step = patch.size, patch.step
    if any(s > n for s, n in zip(size, shape)):
        raise TaskError(f"patch {size} is larger than the cube {shape} (t, lat, lon)")
    per_axis = [(n - s) // k + 1 for n, s, k in zip(shape, size, step)]
    # target pixels per window: sliding sums of size/step cells along each axis
    counts = cells
    for axis, (m, n_windows) in enumerate(zip((s // k for s, k in zip(size, step)), per_axis)):
        total = np.cumsum(counts, axis=axis)
        total = np.concatenate([np.zeros_like(np.take(total, [0], axis=axis)), total], axis=axis)
        upper = np.take(total, np.arange(m, m + n_windows), axis=axis)
        lower = np.take(total, np.arange(0, n_windows), axis=axis)
        counts = upper - lower
    # which blocks a window touches, per axis: a range [first, last]
    first, last = [], []
    for edges, n_windows, s, k in zip(block_edges, per_axis, size, step):
        start = np.arange(n_windows) * k
        first.append(np.searchsorted(edges, start, side="right") - 1)
        last.append(np.searchsorted(edges, start + s - 1, side="right") - 1)
    spans = [int((b - a).max()) for a, b in zip(first, last)]
    none = len(parts)
    low = np.full(per_axis, none, np.int64)  # lowest part touched (none: no part)
    high = np.full(per_axis, -1, np.int64)  # highest part touched
    for offsets in itertools.product(*(range(s + 1) for s in spans)):
        index = np.ix_(*(np.minimum(a + d, b) for a, b, d in zip(first, last, offsets)))
        code = part_of_block[index]
        low = np.minimum(low, np.where(code >= 0, code, none))
        high = np.maximum(high, code)
    across = (high >= 0) & (low != high)
    keep = (counts > 0) & ~across
    origins, targets = {}, {}
    for code, part in enumerate(parts):
        mine = keep & (low == code)
        origins[part] = np.argwhere(mine).astype(np.int64) * np.asarray(step, np.int64)
        targets[part] = int(counts[mine].sum())
    return Windows(
        origins,
        targets,
        dropped_across_parts=int((across & (counts > 0)).sum()),
        without_targets=int(((counts == 0) & (high >= 0) & ~across).sum()),
    )


def n_cells(shape: Triple, step: Triple) -> Triple:
    return tuple(math.ceil(n / k) for n, k in zip(shape, step))  # type: ignore[return-value]
