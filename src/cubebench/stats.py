"""Statistics over repeats: a case's mean with its 95 % interval, and the tests that say
whether two cases differ by more than their run-to-run noise.

A benchmark number from one run mixes the method with the luck of its seed (initialisation,
sample order, split); `cubebench run --repeat N` measures that luck, and these functions turn it
into intervals and p-values. Framework-free (numpy and scipy only), so the report can use them
without importing a machine learning library.

Values that are not finite numbers (None, NaN, inf, booleans, strings) are dropped, never
treated as zero, and counted (`summarize(...)["dropped"]`): a failed measurement must not pull
a mean.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

CONFIDENCE = 0.95

Sample = Iterable[Any] | Mapping[Any, Any]


def _finite(value: Any) -> float | None:
    """`value` as a float when it is a finite real number, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def finite(values: Sample) -> tuple[np.ndarray, int]:
    """(the finite values as a float array, how many others were dropped). A mapping's values
    are taken (in its order)."""
    items = list(values.values() if isinstance(values, Mapping) else values)
    kept = [x for x in map(_finite, items) if x is not None]
    return np.asarray(kept, dtype=float), len(items) - len(kept)


def summarize(values: Sample, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """n, mean, sd (n − 1 in the denominator), the Student t interval of the mean
    (ci95_low, ci95_high, half_width) and `dropped` (non-finite values left out).

    The t interval, not mean ± 1.96 sd/√n: with the handful of repeats a benchmark can afford,
    the normal approximation would claim too narrow an interval. With one value there is no
    spread to estimate, so sd and the interval are None (unknown), never zero (which would
    claim a perfectly repeatable number); with none, the mean is None too."""
    from scipy import stats

    x, dropped = finite(values)
    n = len(x)
    out: dict[str, Any] = {
        "n": n,
        "mean": float(x.mean()) if n else None,
        "sd": None,
        "ci95_low": None,
        "ci95_high": None,
        "half_width": None,
        "dropped": dropped,
    }
    if n < 2:
        return out
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))
    mean = out["mean"]
    out.update(sd=sd, ci95_low=mean - half, ci95_high=mean + half, half_width=half)
    return out


def _pairs(a: Sample, b: Sample) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of finite values of `a` and `b`: mappings are matched by key (the seed),
    sequences by position (they must be as long as each other)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = [k for k in a if k in b]
        pairs = [(a[k], b[k]) for k in keys]
    else:
        if isinstance(a, Mapping) or isinstance(b, Mapping):
            raise TypeError("a paired comparison takes two mappings or two sequences")
        xs, ys = list(a), list(b)
        if len(xs) != len(ys):
            raise ValueError(f"paired samples differ in length: {len(xs)} and {len(ys)}")
        pairs = list(zip(xs, ys))
    kept = [(x, y) for x, y in ((_finite(x), _finite(y)) for x, y in pairs) if None not in (x, y)]
    return np.asarray([x for x, _ in kept], float), np.asarray([y for _, y in kept], float)


def _constant(x: np.ndarray) -> bool:
    return bool(np.all(x == x[0]))


def compare(a: Sample, b: Sample, paired: bool) -> float | None:
    """Two-sided p-value for "the means of `a` and `b` are equal".

    `paired`: a paired t-test on the differences, matched by seed (mappings seed -> value) or
    position (sequences): when both cases ran on the same seeds, whatever a seed does to both
    (the split, the sample order) cancels, and the test sees only the cases' difference.
    Otherwise Welch's t-test, which does not assume equal variances: two libraries rarely have
    the same run-to-run spread.

    None where no test is possible: fewer than 2 values (pairs) on either side, or no variance
    at all (both samples constant, or constant differences), where t is 0/0 or x/0."""
    from scipy import stats

    if paired:
        x, y = _pairs(a, b)
        if len(x) < 2 or _constant(x - y):
            return None
        test = stats.ttest_rel
        args: dict[str, Any] = {}
    else:
        (x, _), (y, _) = finite(a), finite(b)
        if len(x) < 2 or len(y) < 2 or (_constant(x) and _constant(y)):
            return None
        test = stats.ttest_ind
        args = {"equal_var": False}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # catastrophic cancellation notes
        p = float(test(x, y, **args).pvalue)
    return p if math.isfinite(p) else None


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values, in the input order; None stays None and does not
    count as a test.

    Comparing every pair of cases makes many tests, and at α = 0.05 one in twenty true nulls
    would look significant by chance; Holm's step-down adjustment keeps the chance of any false
    mark at α (family-wise) and is uniformly more powerful than plain Bonferroni. Compare the
    adjusted values with α directly."""
    tested = [(p, i) for i, p in enumerate(pvalues) if _finite(p) is not None]
    tested.sort()
    m = len(tested)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * float(p)))  # step-down: never decreases
        adjusted[i] = running
    return adjusted
