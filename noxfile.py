"""Automation: `nox -s tests`, `nox -s lint`, `nox -s bench` (see README)."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite, against real servers (S3 emulator, dask cluster) on loopback."""
    session.install("-e", ".[dev,torch,tf]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The main job in a local venv, on the embedded synthetic cube.

    Until the runner lands this makes the cube and prints the prepared task; pass a cube spec
    after `--` to use another one: `nox -s bench -- synthetic:tiny`.
    """
    session.install("-e", ".")
    cube = session.posargs[0] if session.posargs else "synthetic:small"
    session.run("cubebench", "prepare", "--cube", cube)
