"""Shared fixtures: an isolated cube cache per test session and small cubes made once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def cube_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic cubes of this session go to a fresh cache dir (also for CLI subprocesses)."""
    path = Path(os.environ.get("CUBEBENCH_TEST_CACHE") or tmp_path_factory.mktemp("cube-cache"))
    os.environ["CUBEBENCH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny(cube_cache: Path):
    """The tiny synthetic cube (balanced layout), opened."""
    from cubebench.cube import open_cube

    return open_cube("synthetic:tiny")


@pytest.fixture(scope="session")
def tiny_task(tiny):
    from cubebench.task import get_task, prepare_task

    return prepare_task(get_task("lst-from-t2m"), tiny)
