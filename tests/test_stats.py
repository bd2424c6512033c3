"""`cubebench.stats`: intervals and tests over repeats, against textbook values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sp

from cubebench.stats import compare, finite, holm, summarize

# Student's sleep data (Cushny & Peebles 1905; R's `sleep`): extra hours of sleep under two
# drugs, the same ten patients. R: t.test(g1) -> mean 0.75, 95 % CI -0.5297804 .. 2.0297804;
# t.test(g1, g2, paired = TRUE) -> t = -4.0621, df = 9, p = 0.002833;
# t.test(g1, g2) (Welch) -> t = -1.8608, df = 17.776, p = 0.07939.
G1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
G2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_summarize_textbook():
    s = summarize(G1)
    assert s["n"] == 10 and s["dropped"] == 0
    assert s["mean"] == pytest.approx(0.75)
    assert s["sd"] == pytest.approx(1.789010, abs=1e-6)
    assert s["ci95_low"] == pytest.approx(-0.5297804, abs=1e-6)
    assert s["ci95_high"] == pytest.approx(2.0297804, abs=1e-6)
    assert s["half_width"] == pytest.approx((s["ci95_high"] - s["ci95_low"]) / 2)


def test_summarize_equals_numpy_and_scipy():
    x = np.random.default_rng(1).normal(3.0, 0.5, 7)
    s = summarize(x)
    low, high = sp.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sp.sem(x))
    assert s["mean"] == pytest.approx(np.mean(x))
    assert s["sd"] == pytest.approx(np.std(x, ddof=1))
    assert (s["ci95_low"], s["ci95_high"]) == pytest.approx((low, high))


def test_one_value_has_no_interval():
    s = summarize([1.5])
    assert s["n"] == 1 and s["mean"] == 1.5
    assert s["sd"] is None and s["half_width"] is None  # unknown, not zero
    assert s["ci95_low"] is None and s["ci95_high"] is None
    empty = summarize([])
    assert empty["n"] == 0 and empty["mean"] is None


def test_non_finite_values_dropped_and_counted():
    s = summarize([1.0, None, float("nan"), 2.0, float("inf"), 3.0, True, "4"])
    assert s["n"] == 3 and s["dropped"] == 5
    assert s["mean"] == pytest.approx(2.0)
    assert s["sd"] == pytest.approx(1.0)
    values, dropped = finite({0: 1.0, 1: None, 2: np.float32(2.5)})
    assert values.tolist() == [1.0, 2.5] and dropped == 1


def test_compare_textbook():
    assert compare(G1, G2, paired=True) == pytest.approx(0.002833, abs=1e-6)
    assert compare(G1, G2, paired=False) == pytest.approx(0.07939, abs=1e-5)


def test_compare_equals_scipy():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, 5), rng.normal(1, 2, 4)
    assert compare(a, b, paired=False) == pytest.approx(sp.ttest_ind(a, b, equal_var=False).pvalue)
    c = a + rng.normal(0.3, 0.1, 5)
    assert compare(a, c, paired=True) == pytest.approx(sp.ttest_rel(a, c).pvalue)


def test_paired_matches_by_seed():
    a = {0: 1.0, 1: 2.0, 2: 3.5, 3: 4.0}
    b = {3: 4.6, 0: 1.5, 2: 3.9, 1: 2.7}  # another order: matched by key, not position
    expected = sp.ttest_rel([1.0, 2.0, 3.5, 4.0], [1.5, 2.7, 3.9, 4.6]).pvalue
    assert compare(a, b, paired=True) == pytest.approx(expected)
    # a pair with a missing value on one side is left out, the rest stays paired
    b_gap = {**b, 1: None}
    expected = sp.ttest_rel([1.0, 3.5, 4.0], [1.5, 3.9, 4.6]).pvalue
    assert compare(a, b_gap, paired=True) == pytest.approx(expected)
    with pytest.raises(ValueError):
        compare([1.0, 2.0], [1.0, 2.0, 3.0], paired=True)


def test_compare_untestable_is_none():
    assert compare([1.0], [2.0, 3.0], paired=False) is None  # one value
    assert compare([1.0, None], [2.0, 3.0], paired=False) is None  # one finite value
    assert compare([1.0, 1.0], [2.0, 2.0], paired=False) is None  # no variance at all
    assert compare([1.0, 2.0], [2.0, 3.0], paired=True) is None  # constant differences
    assert compare({0: 1.0}, {0: 2.0}, paired=True) is None
    # one constant side is fine for Welch: the other carries the variance
    p = compare([1.0, 1.0, 1.0], [2.0, 2.5, 3.0], paired=False)
    assert p is not None and 0 < p < 1


def test_holm_textbook():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005, 3 x 0.01, 2 x 0.03, max(1 x 0.04, 0.06)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_holm_skips_none_and_equals_definition():
    pvalues = [0.02, None, 0.001, float("nan"), 0.04, 0.3]
    adjusted = holm(pvalues)
    assert adjusted[1] is None and adjusted[3] is None
    tested = [p for p in pvalues if p is not None and not math.isnan(p)]
    expected = _holm_reference(tested)
    assert [a for a in adjusted if a is not None] == pytest.approx(expected)


def _holm_reference(p: list[float]) -> list[float]:
    """Holm's definition, written out: adj(i) = max over j <= rank(i) of (m - j) p(j)."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    for rank, i in enumerate(order):
        out[i] = min(1.0, max((m - j) * p[order[j]] for j in range(rank + 1)))
    return out
