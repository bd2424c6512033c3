"""Tasks as TOML files: the built-in ones are exactly the former Python definitions, a user's
file runs every case that fits it (the others listed with the reason), its text is kept in
run.json, and a bad file is one line and exit 2."""

from __future__ import annotations

import json
import os

import pytest

from cubebench import results
from cubebench.discovery import discover
from cubebench.errors import TaskError
from cubebench.splits import Split
from cubebench.task import Box, TaskSpec, builtin_tasks, get_task, task_for
from cubebench.taskfiles import spec_from_toml
from cubebench.windows import Patch
from run_cli import run_cubebench

TWO_INPUTS = """
name = "lst-from-t2m-and-moisture"
inputs = ["air_temperature_2m", "root_moisture"]
coord_features = ["lat", "sin_doy", "cos_doy"]
target = "land_surface_temperature"
split = "blocks:46d,10deg"
"""


def test_the_builtin_task_files_are_the_former_definitions():
    """What task.py defined in Python before the tasks became files, field by field."""
    assert builtin_tasks() == {
        "lst-from-t2m": TaskSpec(),
        "lst-from-t2m-transfer": TaskSpec(
            name="lst-from-t2m-transfer",
            split="region",
            source_box=Box(20.0, 70.0),
            target_box=Box(-60.0, -10.0),
        ),
        "lst-gapfill": TaskSpec(name="lst-gapfill", patch=Patch(), split=Split(space_block="64px")),
    }


def test_a_task_file_sets_every_field():
    spec = spec_from_toml(
        """
        name = "mine"
        inputs = ["a", "b"]
        coord_features = ["lat", "lon"]
        target = "t"
        region = [30, 60, -10, 40]
        time_range = ["2016-01-01", "2017-12-31"]
        fractions = [0.6, 0.2, 0.2]
        split = "time:2016-12-31,2017-06-30"
        buffer = 2
        seed = 7
        [windows]
        size = [2, 8, 8]
        stride = [1, 4, 4]
        gap_fraction = 0.5
        gap_size = 2
        """
    )
    assert spec == TaskSpec(
        name="mine",
        inputs=("a", "b"),
        coord_features=("lat", "lon"),
        target="t",
        region=Box(30, 60, -10, 40),
        time_range=("2016-01-01", "2017-12-31"),
        fractions=(0.6, 0.2, 0.2),
        split=Split(kind="time", dates=("2016-12-31", "2017-06-30"), buffer=2),
        seed=7,
        patch=Patch(size=(2, 8, 8), stride=(1, 4, 4), gap_fraction=0.5, gap_size=2),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x\ninputs = [', "not TOML"),
        ('name = "x"\ninputz = ["a"]', "unknown key(s) ['inputz']; known: name, inputs"),
        ('inputs = ["a"]', "a task needs a name"),
        ('name = "x"\ninputs = "a"', "inputs must be a list"),
        ('name = "x"\nregion = [1, 2, 3]', "region is [lat_min, lat_max]"),
        ('name = "x"\nsplit = "blocks:46d,10deg"\n[windows]\nsize = [1, 16]', "patch size"),
        ('name = "x"\n[windows]\nsizes = [1, 16, 16]', "[windows]: unknown key(s) ['sizes']"),
        ('name = "x"\nsplit = "region"', "region split needs both a source box"),
    ],
)
def test_a_bad_task_file_is_one_clear_line(text, message):
    with pytest.raises(TaskError) as raised:
        spec_from_toml(text, "task file my.toml")
    line = str(raised.value)
    assert line.startswith("task file my.toml: ") and message in line and "\n" not in line


def test_what_a_case_can_solve_follows_from_its_own_task():
    cases = {name: cls for name, (_, cls) in discover().items()}
    two_inputs = spec_from_toml(TWO_INPUTS)
    windows = get_task("lst-gapfill")
    transfer = get_task("lst-from-t2m-transfer")
    assert cases["torch-mlp"].fits(two_inputs) is None
    assert cases["sklearn-hgb"].fits(two_inputs) is None
    assert cases["torch-cnn"].fits(two_inputs) == "solves window tasks, not pixel tasks"
    assert cases["torch-mlp"].fits(windows) == "solves pixel tasks, not window tasks"
    assert "needs a region (transfer) split" in cases["torch-transfer"].fits(two_inputs)
    assert "does not transfer" in cases["torch-mlp"].fits(transfer)
    assert cases["keras-transfer"].fits(transfer) is None


def test_inputs_and_target_override_any_task():
    spec = task_for("lst-from-t2m", {"inputs": ["air_temperature_2m", "root_moisture"]})
    assert spec.inputs == ("air_temperature_2m", "root_moisture")
    assert spec.features == ("air_temperature_2m", "root_moisture", "lat", "sin_doy", "cos_doy")
    stored = {"task": "/gone/mine.toml", "toml": TWO_INPUTS, "target": "root_moisture"}
    spec = task_for("lst-from-t2m", stored)  # a run's stored text, whatever the path holds
    assert spec.name == "lst-from-t2m-and-moisture" and spec.target == "root_moisture"


def test_cubebench_tasks_lists_the_files():
    proc = run_cubebench("tasks", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["task"] for r in rows] == ["lst-from-t2m", "lst-from-t2m-transfer", "lst-gapfill"]
    for row in rows:
        assert get_task(row["file"]) == get_task(row["task"])  # a path works as the name does


@pytest.mark.slow  # every pixel case on the tiny cube
def test_a_task_file_with_two_inputs_runs_every_case_that_fits(tmp_path):
    task = tmp_path / "two.toml"
    task.write_text(TWO_INPUTS)
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = run_cubebench(
        "run", "--cube", "synthetic:tiny", "--task", str(task), "--epochs", "1",
        "--threads", "1", "--out", str(out), "--run-id", "two", "--no-tracking", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    available = {name: cls for name, (_, cls) in discover().items()}
    spec = spec_from_toml(TWO_INPUTS)
    fitting = [n for n, cls in available.items() if cls.fits(spec) is None]
    assert set(fitting) >= {"sklearn-sgd", "sklearn-hgb", "torch-mlp", "keras-mlp"}
    manifest, found = results.load_run(out / "two")
    assert manifest["cases"] == fitting
    assert manifest["task_choice"]["toml"] == TWO_INPUTS  # the run keeps its task file
    assert all(r["status"] == "ok" for r in found), [(r["case"], r["reason"]) for r in found]
    assert {r["task"] for r in found} == {"lst-from-t2m-and-moisture"}
    for name in set(available) - set(fitting):  # each one left out, with the reason
        assert f"not run: {name}: it {available[name].fits(spec)}" in proc.stderr


def test_a_case_named_for_a_task_it_cannot_solve_is_one_line(tmp_path):
    task = tmp_path / "two.toml"
    task.write_text(TWO_INPUTS)
    proc = run_cubebench(
        "run", "--cube", "synthetic:tiny", "--task", str(task), "--cases", "torch-cnn",
        "--out", str(tmp_path / "results"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "cubebench: error: case torch-cnn cannot run the task: it solves window tasks, not "
        "pixel tasks (lst-from-t2m-and-moisture)"
    )
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"\ninputs = ["no_such_variable"]', "variable 'no_such_variable' not in cube"),
        ('name = "x"\nsplit = "blocks:46d,64px"\n[windows]\nsize = [1, 128, 128]', "larger than"),
    ],
)
def test_a_task_the_cube_cannot_hold_is_one_line_before_anything_runs(tmp_path, text, message):
    task = tmp_path / "mine.toml"
    task.write_text(text)
    out = tmp_path / "results"
    proc = run_cubebench(
        "run", "--cube", "synthetic:tiny", "--task", str(task), "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("cubebench: error: task x: ") and message in line
    assert not out.exists()
