"""The real `cubebench` command in a subprocess, for the tests that drive the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

CLI = (sys.executable, "-m", "cubebench")


def run_cubebench(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 900,
    prefix: Sequence[str] = (),
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run `cubebench ARGS` to the end (after `prefix`, e.g. `setpriv ...`, when given);
    `timeout` only guards against a hang."""
    return subprocess.run(
        [*prefix, *CLI, *args],
        capture_output=True,
        text=True,
        env=env if env is not None else os.environ,
        cwd=cwd,
        timeout=timeout,
    )
