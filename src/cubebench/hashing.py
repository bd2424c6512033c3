"""Counter-based hashing: random-looking values as pure functions of an index, so that the
synthetic cube's noise and the windows' hidden squares need no generator state and come out
the same in every chunk layout."""

from __future__ import annotations

import numpy as np


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash: uniform uint64 from any uint64, so noise needs no RNG state."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
