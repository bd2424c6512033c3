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


# --- tiers: markers `docker`, `browser`, `server`, `slow` (in pyproject.toml) ---------------------

REQUIRE_DOCKER = "CUBEBENCH_REQUIRE_DOCKER"
REQUIRE_BROWSER = "CUBEBENCH_REQUIRE_BROWSER"


def _docker_engine() -> str | None:
    """None when a Docker engine answers, else why not (one line)."""
    import shutil
    import subprocess

    if not shutil.which("docker"):
        return "no docker client on PATH"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"`docker info` failed: {error}"
    if info.returncode:
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine answers (`docker info`: {last[:160]})"
    return None


def _chromium() -> str | None:
    """None when Debian's chromium is installed, else why not."""
    import shutil

    return None if shutil.which("chromium") else "no chromium on PATH (tests/ensure-chromium.sh)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Docker tests without an engine, browser tests without chromium: skipped with the
    reason, one line in the summary (the `tests` nox session installs both only as root);
    with CUBEBENCH_REQUIRE_DOCKER=1 / CUBEBENCH_REQUIRE_BROWSER=1 (CI) they run, and fail,
    instead."""
    for marker, required, missing in (
        ("docker", REQUIRE_DOCKER, _docker_engine),
        ("browser", REQUIRE_BROWSER, _chromium),
    ):
        marked = [item for item in items if item.get_closest_marker(marker)]
        if not marked or os.environ.get(required) == "1":
            continue
        why = missing()
        if why is None:
            continue
        skip = pytest.mark.skip(reason=f"{why}; set {required}=1 to make this a failure")
        for item in marked:
            item.add_marker(skip)
