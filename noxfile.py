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
    session.install("-e", ".[dev,sklearn,torch,tf,track]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The main job in a local venv: every case on the embedded synthetic cube, then the
    report. Arguments after `--` go to `cubebench run`, e.g.
    `nox -s bench -- --cube synthetic:tiny --epochs 1 --cases torch-mlp,keras-mlp`."""
    session.install("-e", ".[sklearn,torch,tf,track]")
    args = session.posargs or ["--cube", "synthetic:small"]
    session.run("cubebench", "run", *args)
