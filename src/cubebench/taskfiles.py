"""Tasks as TOML files: the built-in tasks ship as files in `cubebench/tasks/`, and a user's own
(their inputs, target, region, period, split, windows) is a file of the same form, given by
path wherever a task name is taken (`--task NAME|PATH`).

```toml
name = "lst-from-t2m"
inputs = ["air_temperature_2m"]
coord_features = ["lat", "sin_doy", "cos_doy"]   # of lat, lon, sin_doy, cos_doy
target = "land_surface_temperature"
region = [30.0, 60.0, -10.0, 40.0]               # optional: lat_min, lat_max, lon_min, lon_max
time_range = ["2016-01-01", "2018-12-31"]        # optional
fractions = [0.7, 0.15, 0.15]                    # train, val, test
split = "blocks:46d,10deg"                        # as --split takes it
buffer = 0                                        # optional: as --buffer
seed = 0

[transfer]             # a region split's boxes: pretrain in source, transfer to target
source = [20.0, 70.0]
target = [-60.0, -10.0]

[windows]              # window samples (gap filling) instead of pixels
size = [1, 16, 16]
stride = [1, 16, 16]   # optional: default size
gap_fraction = 0.25
gap_size = 4
```
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from cubebench.errors import TaskError
from cubebench.splits import Split
from cubebench.task import Box, TaskSpec
from cubebench.windows import Patch

KEYS = (
    "name", "inputs", "coord_features", "target", "region", "time_range", "fractions",
    "split", "buffer", "seed", "transfer", "windows",
)  # fmt: skip
WINDOW_KEYS = ("size", "stride", "gap_fraction", "gap_size")


def builtin_files() -> dict[str, Path]:
    """name -> file of every task shipped with cubebench."""
    folder = resources.files("cubebench") / "tasks"
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".toml")}


def _box(value: Any, where: str) -> Box:
    if not isinstance(value, list) or len(value) not in (2, 4):
        raise TaskError(f"{where} is [lat_min, lat_max] or [lat_min, lat_max, lon_min, lon_max]")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise TaskError(f"{where} takes numbers, got {value!r}")
    return Box(*(float(v) for v in value))


def _table(value: Any, where: str, keys: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise TaskError(f"[{where}] must be a table")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise TaskError(f"[{where}]: unknown key(s) {unknown}; known: {', '.join(keys)}")
    return value


def spec_from_toml(text: str, source: str = "task file") -> TaskSpec:
    """The TaskSpec a task file describes; a mistake is one TaskError line naming `source`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise TaskError(f"{source}: not TOML ({error})") from None
    try:
        return _spec(data)
    except TaskError as error:
        raise TaskError(f"{source}: {error}") from None
    except TypeError as error:  # a list where a number goes, and such
        raise TaskError(f"{source}: {error}") from None


def _spec(data: dict) -> TaskSpec:
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise TaskError(f"unknown key(s) {unknown}; known: {', '.join(KEYS)}")
    if "name" not in data:
        raise TaskError("a task needs a name")
    fields = {k: v for k, v in data.items() if k not in ("split", "buffer", "transfer", "windows")}
    for key in ("inputs", "coord_features", "fractions", "time_range"):
        if key in fields and not isinstance(fields[key], list):
            raise TaskError(f"{key} must be a list, got {fields[key]!r}")
    if "region" in data:
        fields["region"] = _box(data["region"], "region")
    if "split" in data:
        if not isinstance(data["split"], str):
            raise TaskError(f"split is text as --split takes it, got {data['split']!r}")
        fields["split"] = Split.parse(data["split"])
    if "buffer" in data:
        split = fields.get("split", TaskSpec().split)
        fields["split"] = replace(split, buffer=data["buffer"])
    if "transfer" in data:
        transfer = _table(data["transfer"], "transfer", ("source", "target"))
        fields["source_box"] = _box(transfer.get("source"), "transfer.source")
        fields["target_box"] = _box(transfer.get("target"), "transfer.target")
    if "windows" in data:
        fields["patch"] = Patch(**_table(data["windows"], "windows", WINDOW_KEYS))
    return TaskSpec(**fields)


def load_task(name_or_path: str) -> tuple[TaskSpec, str]:
    """(spec, the file's text) of a built-in task's name or a task file's path."""
    builtin = builtin_files()
    if name_or_path in builtin:
        path = builtin[name_or_path]
    else:
        path = Path(name_or_path)
        if path.suffix != ".toml" and not path.is_file():
            raise TaskError(
                f"unknown task {name_or_path!r}; known: {', '.join(sorted(builtin))}, "
                "or the path of a task file (.toml)"
            )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TaskError(f"task file {path}: {error.strerror}") from None
    return spec_from_toml(text, f"task file {path}"), text
