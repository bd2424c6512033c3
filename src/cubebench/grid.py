"""Parameter overrides and grids (`cubebench run --param CASE.KEY=V1,V2`): the cross product of
a case's values runs as variants of it, each named `case[key=value,...]`, each its own job,
result file, mlflow run and report row (benchopt's solver parameter lists are the model)."""

from __future__ import annotations

import fnmatch
import itertools
import json
from dataclasses import dataclass
from typing import Any

from cubebench.errors import CubebenchError


@dataclass(frozen=True)
class ParamValues:
    """One `--param PATTERN.KEY=V1,V2,...`: the values of KEY for the cases PATTERN matches."""

    pattern: str
    key: str
    values: tuple[Any, ...]

    @classmethod
    def parse(cls, text: str) -> ParamValues:
        """`CASE.KEY=V1,V2` (CASE may be a glob such as `*` or `torch-*`). Values are JSON
        where they parse as JSON (`0.001`, `true`, `[64,64]`, `"relu"`), else strings."""
        target, sep, values = text.partition("=")
        pattern, dot, key = target.rpartition(".")
        if not sep or not dot or not pattern or not key or not values.strip():
            raise CubebenchError(f"--param {text!r}: write CASE.KEY=VALUE[,VALUE...]")
        return cls(pattern.strip(), key.strip(), _values(values))


def _values(text: str) -> tuple[Any, ...]:
    """The comma-separated values of one --param, commas inside brackets kept."""
    try:
        parsed = json.loads(f"[{text}]")
    except ValueError:
        parsed = None
    if parsed is not None:
        return tuple(parsed)
    out, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            out.append(_value(text[start:i].strip()))
            start = i + 1
    if any(v == "" for v in out):
        raise CubebenchError(f"--param values {text!r}: an empty value")
    return tuple(out)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def variant_name(case: str, overrides: dict[str, Any]) -> str:
    """`case[key=value,...]`, values as JSON without spaces (strings bare)."""
    if not overrides:
        return case
    shown = (
        f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
        for k, v in overrides.items()
    )
    return f"{case}[{','.join(shown)}]"


def expand(
    cases: list[str], parameters: dict[str, dict[str, Any]], grid: list[ParamValues]
) -> dict[str, tuple[str, dict[str, Any]]]:
    """variant name -> (case, overrides) of every variant of the selected `cases`, in case
    order; a case without --param is its one variant. `parameters`: every known case -> its
    default parameters. A pattern that matches no known case, or a key that no case it
    matches has, is a CubebenchError listing the valid names, before anything runs; a
    pattern that matches known cases left out of the selection sets nothing (`bench-gpu`
    gives every image the same --param and each image its own cases)."""
    chosen: dict[str, dict[str, tuple[Any, ...]]] = {case: {} for case in cases}
    for spec in grid:
        matched = [c for c in parameters if fnmatch.fnmatchcase(c, spec.pattern)]
        if not matched:
            raise CubebenchError(
                f"--param {spec.pattern}.{spec.key}: no case matches {spec.pattern!r}; "
                f"known: {', '.join(parameters)}"
            )
        having = [c for c in matched if spec.key in parameters[c]]
        if not having:
            known = sorted({k for c in matched for k in parameters[c]})
            raise CubebenchError(
                f"--param {spec.pattern}.{spec.key}: no parameter {spec.key!r} in "
                f"{', '.join(matched)}; known: {', '.join(known) or 'none'}"
            )
        for case in (c for c in having if c in chosen):  # `*.batch_size`: where there is one
            chosen[case][spec.key] = spec.values
    variants: dict[str, tuple[str, dict[str, Any]]] = {}
    for case in cases:
        keys = list(chosen[case])
        for values in itertools.product(*(chosen[case][k] for k in keys)):
            overrides = dict(zip(keys, values, strict=True))
            variants[variant_name(case, overrides)] = (case, overrides)
    return variants
