"""Dates of time ranges and splits, in any calendar (standard, or cftime's 360_day, noleap...)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from cubebench.errors import TaskError


def parse_time(value: object) -> pd.Timestamp:
    """A date of a time range (`"2001-03-01"`, a datetime...) as a tz-naive Timestamp.

    A date that only a 360_day calendar has (`"2001-02-30"`, climate model output) comes back
    as a cftime date of that calendar; `_selection` checks it against the cube's calendar.
    """
    text_or_stamp = isinstance(value, str | np.datetime64 | pd.Timestamp)
    if isinstance(value, bool) or not (text_or_stamp or hasattr(value, "year")):  # a datetime
        raise TaskError(f"a date is text like '2001-03-01', got {value!r}")
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError, OverflowError) as exc:
        other = _date_360_day(value)
        if other is not None:
            return other
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise TaskError(f"not a date: {value!r} ({reason!r})") from None
    if stamp is pd.NaT or pd.isna(stamp):
        raise TaskError(f"not a date: {value!r}")
    if stamp.tzinfo is not None:
        raise TaskError(f"a date without a time zone please (cube times have none), got {value!r}")
    return stamp


def _date_360_day(value: object):
    """`"YYYY-MM-DD"` with a day every month has in a 360_day calendar (29 or 30 February)."""
    match = (
        re.fullmatch(r"\s*(\d{4})-(\d{1,2})-(\d{1,2})\s*", value)
        if isinstance(value, str)
        else None
    )
    if match is None:
        return None
    import cftime

    try:
        return cftime.datetime(*map(int, match.groups()), calendar="360_day")
    except ValueError:
        return None


def date_fields(date) -> tuple[int, ...]:
    """(year, month, day, hour, minute, second): orders dates of any calendar."""
    return tuple(
        int(getattr(date, f)) for f in ("year", "month", "day", "hour", "minute", "second")
    )


def in_calendar(index: pd.Index, dates, what: str) -> list:
    """`dates` (from `parse_time`) as values comparable with the time `index` of a cube."""
    if isinstance(index, pd.DatetimeIndex):
        if not all(isinstance(d, pd.Timestamp) for d in dates):
            raise TaskError(f"{what} is not in the cube's standard calendar")
        return list(dates)
    cls = type(index[0])  # cftime calendars compare with dates of their own calendar
    try:
        return [cls(*date_fields(d)) for d in dates]
    except ValueError as exc:
        raise TaskError(f"{what} not in the cube's calendar: {exc}") from None
