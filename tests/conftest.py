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


# --- tiers: markers `docker`, `server`, `slow` (declared in pyproject.toml) ------------------

REQUIRE_DOCKER = "CUBEBENCH_REQUIRE_DOCKER"


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Docker tests without an engine: skipped with the reason, one line in the summary (the
    `tests` nox session starts an engine only as root); with CUBEBENCH_REQUIRE_DOCKER=1 (CI)
    they run, and fail, instead."""
    docker = [item for item in items if item.get_closest_marker("docker")]
    if not docker or os.environ.get(REQUIRE_DOCKER) == "1":
        return
    why = _docker_engine()
    if why is None:
        return
    skip = pytest.mark.skip(reason=f"{why}; set {REQUIRE_DOCKER}=1 to make this a failure")
    for item in docker:
        item.add_marker(skip)
