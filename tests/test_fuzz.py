"""Fuzzing: no command line and no task value ends in a traceback.

The CLI runs in-process (`cubebench.cli.main`) on generated argument lists, and the parsers behind
its options (and `TaskSpec`, `Box`, `SyntheticSpec`) on generated values. Every input either
works or ends in a `CubebenchError` / exit code 2 with one line on stderr. Nothing heavy runs:
every `--cube` is a path that does not exist, every existing path outside this test's directory
is replaced by one that does not, and make-cube's writer is a stub.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cubebench import cli
from cubebench.cube.access import SyntheticSpec
from cubebench.cube.schema import PROFILES
from cubebench.cube.synthetic import LAYOUTS, PRESETS, parse_chunks
from cubebench.errors import CubebenchError
from cubebench.splits import KINDS, Split
from cubebench.task import (
    COORD_FEATURES,
    Box,
    TaskSpec,
    parse_fractions,
    parse_time,
    parse_time_range,
)

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PARSE = settings(FUZZ, max_examples=400)  # the parsers are fast: look harder
MISSING = "no-such-dir/cube.zarr"  # relative to the test's own (empty) working directory

# --- strategies -----------------------------------------------------------------------------

SPECIAL = [
    "",
    " ",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e400",
    "-1e400",
    "-0",
    "0",
    "1_0",
    "²",
    "١",
    "0x10",
    "1,2",
    "1,,2",
    "-1,-2,-3",
    ",",
    "=",
    "a=b",
    "true",
    "\n",
    "a\nb",
    "\u2028",
    "\x85",
    "\x00",
    "../..",
    "~",
    "%s",
    "{}",
    "synthetic:",
    "synthetic:tiny?seed=-1",
    "s=1&format=9",
    "a=²",
]
number_text = st.one_of(
    st.integers(-3, 3).map(str),
    st.integers().map(str),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(SPECIAL),
)
csv = st.lists(number_text, max_size=5).map(",".join)
value = st.one_of(st.text(max_size=20), number_text, csv)
value |= st.tuples(st.text(max_size=4), value).map("=".join)  # KEY=VALUE


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBPARSERS = _subparsers()
# command -> [(option, its valid choices or None)]
OPTIONS = {
    name: sorted(
        (o, tuple(map(str, a.choices)) if a.choices else None)
        for a in p._actions
        for o in a.option_strings
        if o.startswith("--")
    )
    for name, p in SUBPARSERS.items()
}
NEEDS_CUBE = {name for name, opts in OPTIONS.items() if "--cube" in dict(opts)}


def _with_value(option: tuple[str, tuple | None]) -> st.SearchStrategy[tuple[str, str]]:
    name, choices = option
    values = st.one_of(st.sampled_from(choices), value) if choices else value
    return st.tuples(st.just(name), values)


def tokens(options: list[tuple[str, tuple | None]]) -> st.SearchStrategy[list[str]]:
    """One argument: an option with a value (one of its choices or anything), `--option=value`,
    a bare option or flag, an unknown option or a stray value."""
    option = st.sampled_from(options)
    pair = option.flatmap(_with_value)
    return st.one_of(
        pair.map(list),
        pair.map(lambda t: [f"{t[0]}={t[1]}"]),
        option.map(lambda o: [o[0]]),
        st.sampled_from(["--nope", "-x", "--", "-", "--cube-size=3"]).map(lambda o: [o]),
        value.map(lambda v: [v]),
    )


def argv_for(command: str) -> st.SearchStrategy[list[str]]:
    return st.lists(tokens(OPTIONS[command]), max_size=6).map(
        lambda parts: [command, *(t for part in parts for t in part)]
    )


def _outside(text: str, root: Path) -> bool:
    """`text` names an existing path outside `root` (the test's working directory)."""
    try:
        path = Path(text).expanduser()
        return path.exists() and not path.resolve().is_relative_to(root.resolve())
    except (OSError, ValueError, RuntimeError):
        return False


def sanitize(argv: list[str], root: Path) -> list[str]:
    """Never point the CLI at an existing path outside `root`, and never at a real cube."""
    out = []
    for token in argv:
        head, sep, tail = token.partition("=")
        if _outside(token, root):
            token = MISSING
        elif sep and head.startswith("--") and _outside(tail, root):
            token = f"{head}={MISSING}"
        out.append(token)
    if argv[0] in NEEDS_CUBE:
        out += ["--cube", MISSING]  # the last --cube wins: no cube is ever opened
    return out


# --- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """An empty working directory, no tracking server, and make-cube's writer stubbed."""
    import cubebench.cube.access as access

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    written = []

    def write_cube(ds, path, zarr_format=3, scheduler=None):  # the arguments got this far
        written.append((path, zarr_format))
        return tmp_path / "not-written.zarr"

    monkeypatch.setattr(access, "write_cube", write_cube)
    return work


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        code = exc.code
    out, err = capsys.readouterr()
    where = f"argv={argv!r}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err, where
    assert code in (0, 1, 2), where
    if code == 2:
        lines = err.splitlines()
        assert len(lines) == 1, where
        assert lines[0].startswith("cubebench: error: "), where
    return code, out, err


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(c, marks=pytest.mark.slow) if c == "make-cube" else c
        for c in sorted(SUBPARSERS)
    ],
)
@FUZZ
@given(data=st.data())
def test_cli_never_raises(command, data, sandbox, capsys):
    argv = sanitize(data.draw(argv_for(command), label="argv"), sandbox)
    run_main(argv, capsys)


def test_cli_fuzz_premises(sandbox, capsys):
    """The fuzzed runs reach the code behind the options: each line below fails there."""
    cases = {
        ("prepare", "--region", "nan,1"): "box",
        ("prepare", "--fractions", "1,0,0", "--time", "2001-13-01,2001-03-01"): "date",
        ("prepare", "--fractions", "inf,0,0"): "fractions",
        ("prepare", "--storage-option", "a=²"): "cube not found",  # parsed, then the cube
        ("prepare", "--time", "2002-01-01,2001-01-01"): "empty time range",
        ("make-cube", "--preset", "tiny", "--seed", "-1"): "seed",
        ("make-cube", "--preset", "tiny", "--chunks", "1,0,1"): "chunks",
        ("run", "--timeout", "inf"): "finite",
        ("report", "a\nb"): "no results directory",  # one line, whatever the path holds
    }
    for argv, needle in cases.items():
        code, _, err = run_main(sanitize(list(argv), sandbox), capsys)
        assert code == 2 and needle in err, (argv, err)
    code, out, _ = run_main(
        ["make-cube", "--preset", "tiny", "--chunks", "1,99999999999,1"], capsys
    )
    assert code == 0 and "cube written" in out


# --- the parsers ------------------------------------------------------------------------------


def assert_user_error(exc: BaseException) -> None:
    message = str(exc)
    assert isinstance(exc, CubebenchError), repr(exc)
    assert message.strip() and len(message.splitlines()) == 1, repr(message)


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@PARSE
@given(st.one_of(csv, st.text(max_size=30)))
def test_box_parse(text):
    try:
        box = Box.parse(text)
    except Exception as exc:
        assert_user_error(exc)
        return
    bounds = (box.lat_min, box.lat_max, box.lon_min, box.lon_max)
    assert all(math.isfinite(v) for v in bounds)
    assert box.lat_min < box.lat_max and box.lon_min < box.lon_max


@PARSE
@given(st.lists(finite, min_size=2, max_size=4).filter(lambda v: len(v) != 3))
def test_box_round_trip(values):
    try:
        box = Box.parse(",".join(map(repr, values)))
    except CubebenchError as exc:
        assert "empty box" in str(exc)
        assert values[0] >= values[1] or (len(values) == 4 and values[2] >= values[3])
        return
    assert box == Box(*values)
    assert Box.parse(f"{box.lat_min!r},{box.lat_max!r},{box.lon_min!r},{box.lon_max!r}") == box


@PARSE
@given(st.one_of(csv, st.text(max_size=30)))
def test_fractions(text):
    try:
        fractions = parse_fractions(text)
    except Exception as exc:
        assert_user_error(exc)
        return
    assert len(fractions) == 3 and min(fractions) >= 0 and fractions[0] > 0
    assert math.isclose(sum(fractions), 1.0, abs_tol=1e-6)
    assert TaskSpec(fractions=fractions).fractions == fractions


dates = st.datetimes().map(lambda d: d.isoformat())
date_text = st.one_of(dates, st.dates().map(str), st.text(max_size=12), number_text)


@PARSE
@given(st.one_of(st.tuples(date_text, date_text).map(",".join), st.text(max_size=30)))
def test_time_range(text):
    try:
        start, end = parse_time_range(text)
    except Exception as exc:
        assert_user_error(exc)
        return
    assert f"{start},{end}" == text  # the pair round-trips
    fields = ("year", "month", "day", "hour", "minute", "second")
    first, last = ([getattr(parse_time(v), f) for f in fields] for v in (start, end))
    assert first <= last
    assert TaskSpec(time_range=(start, end)).time_range == (start, end)


@PARSE
@given(st.lists(st.one_of(value, st.tuples(st.text(max_size=8), value).map("=".join)), max_size=4))
def test_storage_options(pairs):
    try:
        options = cli._storage_options(pairs)
    except Exception as exc:
        assert_user_error(exc)
        return
    if not pairs:
        assert options is None
        return
    assert all(isinstance(k, str) and k for k in options)
    for pair in pairs:  # the last pair of a key wins
        key, _, text = pair.partition("=")
        got = options[key]
        if pairs[-1 - [p.partition("=")[0] for p in reversed(pairs)].index(key)] != pair:
            continue
        if text.lower() in ("true", "false"):
            assert got is (text.lower() == "true")
        elif isinstance(got, int):
            assert got == int(text) and text.isascii() and text.isdigit()
        else:
            assert got == text


@PARSE
@given(st.one_of(csv, st.text(max_size=20)))
def test_parse_chunks(text):
    try:
        chunks = parse_chunks(text)
    except Exception as exc:
        assert_user_error(exc)
        return
    assert len(chunks) == 3 and all(isinstance(c, int) and c >= 1 for c in chunks)
    assert parse_chunks(",".join(map(str, chunks))) == chunks


query_value = st.one_of(
    value, st.sampled_from([*PRESETS, *LAYOUTS, *PROFILES, "2", "3", "23,15,30", "0"])
)
query = st.lists(
    st.tuples(st.sampled_from(["layout", "seed", "format", "profile", "x", ""]), query_value),
    max_size=4,
).map(lambda kv: "&".join(f"{k}={v}" for k, v in kv))


@PARSE
@given(
    st.one_of(
        st.tuples(st.sampled_from([*PRESETS, "", "huge", "../x"]), query).map(
            lambda t: f"synthetic:{t[0]}?{t[1]}"
        ),
        st.text(max_size=40).map(lambda t: "synthetic:" + t),
    )
)
def test_synthetic_spec(spec):
    try:
        s = SyntheticSpec.parse(spec)
    except Exception as exc:
        assert_user_error(exc)
        return
    assert s.preset in PRESETS and s.profile in PROFILES and s.zarr_format in (2, 3)
    assert 0 <= s.seed <= SyntheticSpec.SEED_MAX
    assert s.layout in LAYOUTS or len(parse_chunks(s.layout)) == 3
    name = s.cache_name  # a directory name in the cache: never a path elsewhere
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    again = SyntheticSpec.parse(
        f"synthetic:{s.preset}?layout={s.layout}&seed={s.seed}"
        f"&format={s.zarr_format}&profile={s.profile}"
    )
    assert again == s


anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300),
    st.floats(),
    st.text(max_size=10),
    st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=5)), max_size=4),
    st.tuples(st.floats(), st.floats(), st.floats()),
    st.tuples(st.integers(), st.integers(), st.integers()),
)
names = st.lists(st.sampled_from(["air_temperature_2m", "x", "", *COORD_FEATURES]), max_size=3)
ordered = st.lists(finite, min_size=2, max_size=2, unique=True).map(sorted)
boxes = st.tuples(ordered, ordered).map(lambda t: Box(*t[0], *t[1]))


def maybe(strategy):
    return st.one_of(strategy, anything)


lengths = st.one_of(
    st.builds(
        lambda v, u: f"{v}{u}",
        st.integers(-3, 400),
        st.sampled_from(["d", "t", "deg", "px", "x", ""]),
    ),
    st.text(max_size=6),
)
split_texts = st.one_of(
    st.sampled_from(["blocks", "time", "region", "chunks", "", "nope"]),
    st.builds(lambda a, b: f"blocks:{a},{b}", lengths, lengths),
    st.builds(lambda a, b: f"region:{a},{b}", lengths, lengths),
    st.builds(lambda a, b: f"time:{a},{b}", date_text, date_text),
    st.builds(lambda a: f"chunks:{a}", st.text(max_size=8)),
    st.builds(lambda a: f"time:{a}", st.text(max_size=12)),
)


@PARSE
@given(split_texts, st.integers(-2, 3))
def test_split_text(text, buffer):
    """Any --split text is a Split that writes back to itself, or one line of user error."""
    try:
        split = Split.parse(text, buffer)
    except Exception as exc:
        assert_user_error(exc)
        return
    assert split.kind in KINDS and split.buffer == buffer >= 0
    again = Split.parse(str(split).partition(" buffer")[0], buffer)
    assert again == split


@PARSE
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "name": maybe(st.text(max_size=10)),
            "inputs": maybe(names.map(tuple)),
            "coord_features": maybe(names),
            "target": maybe(st.text(max_size=10)),
            "region": maybe(boxes),
            "time_range": maybe(st.tuples(date_text, date_text)),
            "fractions": maybe(st.tuples(finite, finite, finite)),
            "split": maybe(split_texts),
            "source_box": maybe(boxes),
            "target_box": maybe(boxes),
            "seed": anything,
        },
    )
)
def test_task_spec(fields):
    try:
        spec = TaskSpec(**fields)
    except Exception as exc:
        assert_user_error(exc)
        return
    spec.validate()
    assert isinstance(spec.features, tuple) and all(isinstance(f, str) for f in spec.features)
    assert set(spec.coord_features) <= set(COORD_FEATURES)
    assert math.isclose(sum(spec.fractions), 1.0, abs_tol=1e-6) and min(spec.fractions) >= 0
    assert isinstance(spec.split, Split) and spec.split.kind in KINDS
    assert spec.split.kind != "region" or (spec.source_box and spec.target_box)
    hash(spec)  # frozen and hashable: lists became tuples


@PARSE
@given(anything, anything, maybe(finite), maybe(finite))
def test_box_fields(a, b, c, d):
    try:
        box = Box(a, b, c, d)
    except Exception as exc:
        assert_user_error(exc)
        return
    assert box.lat_min < box.lat_max and box.lon_min < box.lon_max
    str(box)
