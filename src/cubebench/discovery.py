"""Finding the cases: every file of `cases/` defines one `Case` class (benchopt's solvers are
the model). The runner, the worker, the notebooks and the asv suite all find cases here, so
none of them imports another to learn what a case is."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from cubebench.case import Case
from cubebench.errors import CubebenchError


def default_cases_dir() -> Path:
    """`$CUBEBENCH_CASES_DIR`, else `cases/` of the source tree, else `./cases`."""
    if env := os.environ.get("CUBEBENCH_CASES_DIR"):
        return Path(env)
    in_tree = Path(__file__).resolve().parents[2] / "cases"
    return in_tree if in_tree.is_dir() else Path("cases")


def load_case_class(path: Path) -> type[Case]:
    """The `Case` class of one case file (imported by path: cases/ is not a package)."""
    name = f"cubebench_case_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CubebenchError(f"cannot import case file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # a broken case file is a user mistake: one line, no traceback
        del sys.modules[name]
        raise CubebenchError(f"case file {path}: {type(error).__name__}: {error}") from None
    cls = getattr(module, "Case", None)
    if not (isinstance(cls, type) and issubclass(cls, Case)) or not getattr(cls, "name", None):
        raise CubebenchError(f"{path} defines no `Case` class with a name")
    return cls


def discover(cases_dir: Path | None = None) -> dict[str, tuple[Path, type[Case]]]:
    """name -> (file, class) of every case file, in file order."""
    cases_dir = Path(cases_dir or default_cases_dir())
    if not cases_dir.is_dir():
        raise CubebenchError(f"no cases directory at {cases_dir}")
    found: dict[str, tuple[Path, type[Case]]] = {}
    for path in sorted(cases_dir.glob("*.py")):
        if path.name.startswith("_"):
            continue
        cls = load_case_class(path)
        if cls.name in found:
            first = found[cls.name][0]
            raise CubebenchError(f"case {cls.name!r} is defined twice: {first}, {path}")
        found[cls.name] = (path, cls)
    return found


def select(available: dict, wanted: str) -> list[str]:
    """The case names of a comma-separated selection (or `all`), in the given order."""
    if wanted == "all":
        return list(available)
    names = list(dict.fromkeys(n.strip() for n in wanted.split(",") if n.strip()))
    unknown = [n for n in names if n not in available]
    if unknown:
        raise CubebenchError(f"unknown case(s) {unknown}; known: {', '.join(available)}")
    if not names:
        raise CubebenchError("no case selected")
    return names
