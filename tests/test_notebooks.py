"""The notebooks in notebooks/: committed without outputs, with a `parameters` cell, and every
one executes (papermill) on the tiny cube with one epoch; 05 shows every case of a real run.

The kernel is this interpreter: a kernel spec written into a temporary JUPYTER_PATH points at
`sys.executable`, so a fresh nox venv runs the notebooks with the packages it installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
WALKTHROUGHS = {  # notebook -> the framework it needs
    "01_scikit_learn": "sklearn",
    "02_pytorch": "torch",
    "03_tensorflow_keras": "keras",
    "04_transfer_learning": "torch",
}
COMPARE = "05_compare_libraries"
KERNEL = "cubebench-test"
SMALL_SUITE = ["sklearn-sgd", "sklearn-hgb"]

nbformat = pytest.importorskip("nbformat")


def committed() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_every_notebook_is_there():
    names = {p.stem for p in committed()}
    assert names == {*WALKTHROUGHS, COMPARE}


@pytest.mark.parametrize("path", committed(), ids=lambda p: p.stem)
def test_committed_without_outputs_with_parameters(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, path
    for cell in code:
        assert cell.outputs == [], f"{path.name}: a cell has outputs: strip them"
        assert cell.execution_count is None, f"{path.name}: a cell has an execution count"
    assert "parameters" in code[0].metadata.get("tags", []), f"{path.name}: no parameters cell"
    for name in ("cube", "epochs", "device"):
        assert f"{name} = " in code[0].source
    if path.stem == COMPARE:
        assert "run_dir = None" in code[0].source


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A kernel spec that runs this interpreter, found through JUPYTER_PATH."""
    pytest.importorskip("papermill")
    pytest.importorskip("ipykernel")
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel_json = {"argv": argv, "display_name": "cubebench tests", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel_json))
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("JUPYTER_PATH")])]
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return KERNEL


def execute(kernel: str, name: str, out_dir: Path, **parameters) -> dict:
    import papermill

    out = out_dir / f"{name}.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"),
        str(out),
        parameters={"cube": "synthetic:tiny", "epochs": 1, **parameters},
        kernel_name=kernel,
        cwd=str(NOTEBOOKS),
        progress_bar=False,
        execution_timeout=300,
    )
    return nbformat.read(out, as_version=4)


def text_of(nb) -> str:
    """Everything the executed cells showed: streams, text and HTML."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if "text" in output:
                parts.append(output["text"])
            data = output.get("data", {})
            parts += [data.get(k, "") for k in ("text/plain", "text/html")]
    return "\n".join(p if isinstance(p, str) else "".join(p) for p in parts)


@pytest.mark.parametrize("name", list(WALKTHROUGHS))
def test_walkthrough_executes_on_tiny(kernel: str, name: str, tmp_path: Path):
    pytest.importorskip(WALKTHROUGHS[name])
    nb = execute(kernel, name, tmp_path)
    shown = text_of(nb)
    assert "RMSE" in shown  # the inline run's table
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # cube maps, split, predictions, residual map, loss curve


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real suite run through the CLI: two scikit-learn cases on tiny, one epoch."""
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("suite")
    command = [sys.executable, "-m", "cubebench", "run", "--cube", "synthetic:tiny"]
    command += ["--epochs", "1", "--cases", ",".join(SMALL_SUITE), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = [p.parent for p in out.glob("*/run.json")]
    return run_dir


def test_compare_shows_every_case_of_the_run(kernel: str, small_run: Path, tmp_path: Path):
    nb = execute(kernel, COMPARE, tmp_path, run_dir=str(small_run))
    shown = text_of(nb)
    found = [line for line in shown.splitlines() if line.startswith("cases in the run: ")]
    assert found, "the notebook printed no case list"
    assert json.loads(found[-1].removeprefix("cases in the run: ")) == SMALL_SUITE
    for case in SMALL_SUITE:  # in the HTML table of the results
        assert f"<td>{case}</td>" in shown


def test_inline_run_is_the_suites_evaluation(tiny, tmp_path: Path):
    """What the notebooks plot is what the suite measures: the per-sample predictions give the
    RMSE of `measure.evaluate`, the residual map averages them, the objects render as HTML."""
    pytest.importorskip("sklearn")
    import numpy as np

    from cubebench import explore

    run = explore.run_case_inline(
        "sklearn-sgd", tiny, {"epochs": 1}, tensorboard_dir=tmp_path / "tb", progress=False
    )
    frame = explore.predictions(run)
    assert len(frame) == run.evaluated_samples == run.task.samples["test"]
    rmse = float(np.sqrt(np.mean(frame["residual"] ** 2)))
    assert rmse == pytest.approx(run.metrics["rmse"], rel=1e-5)  # float32 batches
    residuals = explore.residual_map(run, frame=frame)
    assert residuals.dims == ("lat", "lon")
    assert np.nansum(residuals.values * 0 + 1) == frame.groupby(["lat", "lon"]).ngroups
    for shown in (run, run.task, run.loading):
        assert "<table>" in shown._repr_html_()
    assert explore.split_map(run.task).max() == len(run.task.blocks) - 1
