"""Small display helpers shared by the report and the notebook views (`_repr_html_` of a
prepared task, of loading costs, of an inline run).

They live apart from `cubebench.report` so that showing a task in a notebook does not import
the report (its tables, statistics and plots); numbers look the same everywhere (`fmt`).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

MISSING = "—"


def number(value: Any) -> float | None:
    """A finite number, or None (missing, null, NaN, inf, a boolean, not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def fmt(value: Any) -> str:
    """A number to 3 significant digits, plainly: 1.23, 0.0123, 12.3, 123, 12,300; tiny
    numbers in exponent form; None, NaN and inf as "—"."""
    x = number(value)
    if x is None:
        return MISSING
    if x == 0:
        return "0"
    rounded = float(f"{x:.3g}")
    exponent = math.floor(math.log10(abs(rounded)))
    if exponent < -3:
        return f"{rounded:.2e}"
    if exponent >= 3:
        return f"{round(rounded):,}"
    return f"{rounded:.{max(0, 2 - exponent)}f}"


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_value_text(v) for v in value)
    return MISSING if value is None else str(value)


def facts_table(rows: dict[str, Any] | Sequence[tuple[str, Any]], title: str | None = None) -> str:
    """A two-column (name, value) HTML table: the `_repr_html_` of a prepared task, loading
    costs, an inline run. Floats as in the report (`fmt`)."""
    items = rows.items() if isinstance(rows, dict) else rows
    e = html.escape
    body = "".join(
        f"<tr><th style='text-align:left'>{e(str(k))}</th><td>{e(_value_text(v))}</td></tr>"
        for k, v in items
    )
    caption = f"<caption style='text-align:left'><b>{e(title)}</b></caption>" if title else ""
    return f"<table>{caption}{body}</table>"
