"""Automation: `nox -s tests`, `nox -s lint`, `nox -s bench`, `nox -s mlflow-ui` (see README)."""

from __future__ import annotations

from pathlib import Path

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


@nox.session(name="mlflow-ui", python=PYTHON)
def mlflow_ui(session: nox.Session) -> None:
    """The mlflow UI on http://127.0.0.1:5000 over a results directory's store:
    `nox -s mlflow-ui -- [RESULTS_DIR] [mlflow ui options, e.g. --port 5001]`."""
    args = list(session.posargs)
    root = Path(args.pop(0) if args and not args[0].startswith("-") else "results").resolve()
    store = root / "mlflow.db"
    if not store.is_file():
        session.error(f"no mlflow store at {store}: run `nox -s bench` first")
    session.install("mlflow==3.17.2")
    session.run(
        "mlflow",
        "ui",
        "--host",
        "127.0.0.1",
        "--backend-store-uri",
        f"sqlite:///{store}",
        *args,
    )
