"""Parameter overrides and grids (`run --param CASE.KEY=V1,V2`): the cross product runs as
named variants, each with its parameters in its result, its own mlflow run and report row; a
bad --param fails before anything runs, with the valid names."""

from __future__ import annotations

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from cubebench import results
from cubebench.errors import CubebenchError
from cubebench.grid import ParamValues, expand, variant_name
from run_cli import run_cubebench

PARAMS = {
    "torch-mlp": {"epochs": 6, "batch_size": 2048, "learning_rate": 0.003, "hidden": [64, 64]},
    "sklearn-hgb": {"max_iter": 300, "learning_rate": 0.1},
    "keras-mlp": {"epochs": 6, "batch_size": 2048, "activation": "relu"},
}


def test_values_are_json_where_they_parse_and_strings_otherwise():
    assert ParamValues.parse("torch-mlp.learning_rate=0.001,0.003") == ParamValues(
        "torch-mlp", "learning_rate", (0.001, 0.003)
    )
    assert ParamValues.parse("*.hidden=[64,64],[128]").values == ([64, 64], [128])
    assert ParamValues.parse("keras-mlp.activation=relu,tanh").values == ("relu", "tanh")
    assert ParamValues.parse("k.x=true").values == (True,)
    assert ParamValues.parse("a.b.c=1").pattern == "a.b"  # the key follows the last dot
    for bad in ("torch-mlp", "torch-mlp.lr", "lr=1", ".lr=1", "torch-mlp.=1", "x.y="):
        with pytest.raises(CubebenchError, match=r"CASE\.KEY=VALUE"):
            ParamValues.parse(bad)


def test_a_two_by_two_grid_gives_four_variants_in_order():
    grid = [
        ParamValues.parse("torch-mlp.learning_rate=0.001,0.003"),
        ParamValues.parse("*.batch_size=1024,4096"),
    ]
    variants = expand(["torch-mlp", "keras-mlp", "sklearn-hgb"], PARAMS, grid)
    torch = {n: o for n, (c, o) in variants.items() if c == "torch-mlp"}
    assert list(torch) == [
        "torch-mlp[learning_rate=0.001,batch_size=1024]",
        "torch-mlp[learning_rate=0.001,batch_size=4096]",
        "torch-mlp[learning_rate=0.003,batch_size=1024]",
        "torch-mlp[learning_rate=0.003,batch_size=4096]",
    ]
    assert list(torch.values())[1] == {"learning_rate": 0.001, "batch_size": 4096}
    # `*.batch_size` reaches the cases that have one; sklearn-hgb has none and runs as itself
    assert [n for n, (c, _) in variants.items() if c == "keras-mlp"] == [
        "keras-mlp[batch_size=1024]",
        "keras-mlp[batch_size=4096]",
    ]
    assert variants["sklearn-hgb"] == ("sklearn-hgb", {})
    assert variant_name("torch-mlp", {"hidden": [64, 64], "act": "relu"}) == (
        "torch-mlp[hidden=[64,64],act=relu]"
    )


def test_unknown_cases_and_keys_list_the_valid_names():
    with pytest.raises(CubebenchError, match=r"no case matches 'torch-mpl'; known: torch-mlp"):
        expand(["torch-mlp"], PARAMS, [ParamValues.parse("torch-mpl.epochs=1")])
    with pytest.raises(
        CubebenchError,
        match=r"no parameter 'lr' in torch-mlp; known: batch_size, epochs, hidden, learning_rate",
    ):
        expand(["torch-mlp"], PARAMS, [ParamValues.parse("torch-mlp.lr=1")])
    # a known case left out of the selection: nothing to set (bench-gpu's images)
    assert expand(["sklearn-hgb"], PARAMS, [ParamValues.parse("torch-mlp.epochs=1,2")]) == {
        "sklearn-hgb": ("sklearn-hgb", {})
    }


GRID_CASE = '''
import numpy as np
from cubebench.case import Case as Base

class Case(Base):
    """Predicts a constant `offset`: its parameters are visible in its metrics."""
    name = "const"
    library = "numpy"
    task = "lst-from-t2m"
    parameters = {"offset": 0.0, "scale": 1.0, "epochs": 1}

    def fit(self):
        pass

    def predict(self, x):
        return np.full(len(x), self.params["offset"] * self.params["scale"])
'''


@pytest.mark.slow  # four variants with mlflow
def test_a_grid_runs_each_variant_with_its_parameters_its_mlflow_run_and_its_report_row(
    tmp_path,
):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "const.py").write_text(GRID_CASE)
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = ["run", "--cube", "synthetic:tiny", "--cases-dir", str(cases), "--out", str(out)]
    args += ["--threads", "1", "--run-id", "grid", "--param", "const.offset=0,0.5"]
    args += ["--param", "*.scale=1,2"]
    proc = run_cubebench(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest, found = results.load_run(out / "grid")
    expected = {
        "const[offset=0,scale=1]": (0, 1),
        "const[offset=0,scale=2]": (0, 2),
        "const[offset=0.5,scale=1]": (0.5, 1),
        "const[offset=0.5,scale=2]": (0.5, 2),
    }
    assert manifest["cases"] == list(expected)
    assert manifest["params"] == ["const.offset=0,0.5", "*.scale=1,2"]
    for result in found:
        offset, scale = expected[result["case"]]
        assert result["status"] == "ok"
        assert result["params"] == {"offset": offset, "scale": scale, "epochs": 1}
    # the constant predictions differ exactly where offset * scale does
    by_product: dict[float, set[float]] = {}
    for result in found:
        offset, scale = expected[result["case"]]
        by_product.setdefault(offset * scale, set()).add(result["metrics"]["rmse"])
    assert all(len(rmses) == 1 for rmses in by_product.values()) and len(by_product) == 3
    report = (out / "grid" / "report.md").read_text()
    assert all(f"| {name} " in report for name in expected)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cubebench")
    runs = client.search_runs([experiment.experiment_id], "tags.`cubebench.role` = 'case'")
    assert sorted(r.data.tags["cubebench.case"] for r in runs) == sorted(expected)
    for run in runs:
        offset, scale = expected[run.data.tags["cubebench.case"]]
        assert json.loads(run.data.params["offset"]) == offset
        assert json.loads(run.data.params["scale"]) == scale


def test_a_bad_param_fails_before_anything_runs(tmp_path):
    out = tmp_path / "results"
    proc = run_cubebench(
        "run", "--cube", "synthetic:tiny", "--cases", "torch-mlp", "--out", str(out),
        "--param", "torch-mlp.lr=0.1",
    )  # fmt: skip
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("cubebench: error: --param torch-mlp.lr: no parameter 'lr' in torch-mlp")
    assert "learning_rate" in line
    assert not out.exists()
