"""Regression metrics accumulated over batches, in float64 and physical units.

The test part of a real cube does not fit in memory, so the sums are streamed; the result
equals the numpy formulas on the concatenated arrays (see tests/test_metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RegressionMetrics:
    n: int = 0
    sum_error: float = 0.0  # sum(pred - true): the bias
    sum_abs_error: float = 0.0
    sum_sq_error: float = 0.0
    sum_true: float = 0.0  # of (true - shift): the shift keeps the variance sum exact
    sum_sq_true: float = 0.0
    shift: float | None = None

    def update(self, y_true: np.ndarray, y_pred: np.ndarray) -> None:
        t = np.asarray(y_true, np.float64).ravel()
        p = np.asarray(y_pred, np.float64).ravel()
        if t.shape != p.shape:
            raise ValueError(f"{len(p)} predictions for {len(t)} targets")
        e = p - t
        if self.shift is None and len(t):
            self.shift = float(t.mean())
        t = t - (self.shift or 0.0)
        self.n += len(t)
        self.sum_error += float(e.sum())
        self.sum_abs_error += float(np.abs(e).sum())
        self.sum_sq_error += float(e @ e)
        self.sum_true += float(t.sum())
        self.sum_sq_true += float(t @ t)

    def merge(self, other: RegressionMetrics) -> RegressionMetrics:
        """The sums over both parts (DDP ranks' shares of the test part), re-centred on this
        part's shift so the variance sum stays exact."""
        if other.n == 0:
            return RegressionMetrics(**vars(self))
        if self.n == 0:
            return RegressionMetrics(**vars(other))
        d = (other.shift or 0.0) - (self.shift or 0.0)  # other's (t - s2) = (t - s1) - d
        return RegressionMetrics(
            n=self.n + other.n,
            sum_error=self.sum_error + other.sum_error,
            sum_abs_error=self.sum_abs_error + other.sum_abs_error,
            sum_sq_error=self.sum_sq_error + other.sum_sq_error,
            sum_true=self.sum_true + other.sum_true + other.n * d,
            sum_sq_true=self.sum_sq_true
            + other.sum_sq_true
            + 2 * d * other.sum_true
            + other.n * d * d,
            shift=self.shift,
        )

    def result(self, noise_floor: float | None = None) -> dict[str, float | None]:
        if self.n == 0:
            raise ValueError("no samples to evaluate")
        rmse = float(np.sqrt(self.sum_sq_error / self.n))
        mean = self.sum_true / self.n
        total = self.sum_sq_true - self.n * mean * mean  # sum((t - mean)^2)
        return {
            "n": self.n,
            "rmse": rmse,
            "mae": self.sum_abs_error / self.n,
            "r2": 1.0 - self.sum_sq_error / total if total > 0 else float("nan"),
            "bias": self.sum_error / self.n,
            "noise_floor_rmse": noise_floor,
            "rmse_over_noise_floor": rmse / noise_floor if noise_floor else None,
        }
