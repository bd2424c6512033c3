"""Untrusted inputs: nothing from a cube or a results directory is ever executed or unpickled,
and only case files of the cases directory are imported.

Every planted payload writes a marker file when it runs; the tests run the real CLI and check
that no marker exists afterwards (and, for the pickle payload, that it does run when decoded).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fake_cases import mean_case
from test_errors import assert_user_error, good_cube
from test_report import _mlp, _write_run

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI as the `cubebench` console script runs it: the current directory is not on
    the import path (`python -P`)."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "cubebench", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def payload(marker: Path) -> str:
    """Python source that leaves `marker` behind when it runs."""
    return f"open({str(marker)!r}, 'a').write('ran\\n')\n"


class Exploit:
    """Unpickling this runs `payload`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (payload(self.marker),))


# --- a cube whose codec would unpickle a chunk ----------------------------------------------

SHAPE = (4, 3, 6)
UNSAFE_PICKLE = "NUMCODECS_ALLOW_UNSAFE_PICKLE_DECODE"


def pickle_store(root: Path, marker: Path, victim: str) -> Path:
    """A Zarr v2 store, written file by file as zarr 2 would, whose `victim` array goes through
    numcodecs' `pickle` filter (as an object-dtype array with the pickle object codec) and whose
    only chunk is a pickle that runs `payload(marker)`."""
    root.mkdir(parents=True)
    (root / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (root / ".zattrs").write_text("{}")
    rng = np.random.default_rng(0)
    arrays = {
        "time": (["time"], np.arange(SHAPE[0], dtype="<i8"), {"units": "days since 2001-01-01"}),
        "lat": (["lat"], np.linspace(50.0, -50.0, SHAPE[1]), {}),
        "lon": (["lon"], np.linspace(-150.0, 150.0, SHAPE[2]), {}),
        "air_temperature_2m": (
            ["time", "lat", "lon"],
            (280 + rng.standard_normal(SHAPE)).astype("<f4"),
            {"units": "K"},
        ),
        "land_surface_temperature": (
            ["time", "lat", "lon"],
            (285 + rng.standard_normal(SHAPE)).astype("<f4"),
            {"units": "K"},
        ),
    }
    consolidated = {".zgroup": {"zarr_format": 2}, ".zattrs": {}}
    for name, (dims, data, attrs) in arrays.items():
        evil = name == victim
        meta = {
            "zarr_format": 2,
            "shape": list(data.shape),
            "chunks": list(data.shape),
            "dtype": "|O" if evil else data.dtype.str,
            "compressor": None,
            "fill_value": None if evil else 0,
            "order": "C",
            "filters": [{"id": "pickle", "protocol": 5}] if evil else None,
        }
        zattrs = {"_ARRAY_DIMENSIONS": dims, **attrs}
        (root / name).mkdir()
        (root / name / ".zarray").write_text(json.dumps(meta))
        (root / name / ".zattrs").write_text(json.dumps(zattrs))
        chunk = pickle.dumps(Exploit(marker)) if evil else data.tobytes()
        (root / name / ".".join("0" * data.ndim)).write_bytes(chunk)
        consolidated |= {f"{name}/.zarray": meta, f"{name}/.zattrs": zattrs}
    (root / ".zmetadata").write_text(
        json.dumps({"zarr_consolidated_format": 1, "metadata": consolidated})
    )
    return root


@pytest.mark.parametrize("victim", ["land_surface_temperature", "lat"])
def test_pickle_codec_is_refused(tmp_path, victim, monkeypatch):
    marker = tmp_path / "unpickled"
    store = pickle_store(tmp_path / "evil.zarr", marker, victim)
    # as for a user who allowed numcodecs to unpickle (it refuses by default since 0.16)
    proc = cli("prepare", "--cube", str(store), cwd=tmp_path, env={UNSAFE_PICKLE: "1"})
    line = assert_user_error(proc, repr(victim), "'pickle'")
    assert "codec" in line
    assert not marker.exists(), "the cube's pickle ran"
    # the premise: decoding that chunk with numcodecs' own codec does run the payload
    import numcodecs
    import numcodecs.pickles

    monkeypatch.setattr(numcodecs.pickles, "ALLOW_UNSAFE_PICKLE_DECODE", True)

    control = marker.with_name("unpickleD")  # as long as the name it replaces in the pickle
    chunk = next(p for p in (store / victim).iterdir() if not p.name.startswith("."))
    live = chunk.read_bytes().replace(bytes(marker), bytes(control))
    numcodecs.get_codec({"id": "pickle"}).decode(live)
    assert control.read_text() == "ran\n"


def test_pickle_codec_refused_without_consolidated_metadata_and_in_zarr_v3(tmp_path):
    """Per-array metadata counts too (a reader may skip .zmetadata); v3 names it
    `numcodecs.pickle`."""
    marker = tmp_path / "unpickled"
    v2 = pickle_store(tmp_path / "v2.zarr", marker, "air_temperature_2m")
    zmeta = json.loads((v2 / ".zmetadata").read_text())
    zmeta["metadata"]["air_temperature_2m/.zarray"]["filters"] = None  # looks harmless there
    zmeta["metadata"]["air_temperature_2m/.zarray"]["dtype"] = "<f4"
    (v2 / ".zmetadata").write_text(json.dumps(zmeta))
    proc = cli("prepare", "--cube", str(v2), cwd=tmp_path, env={UNSAFE_PICKLE: "1"})
    assert_user_error(proc, "'air_temperature_2m'", "'pickle'")

    v3 = good_cube(tmp_path / "v3.zarr")
    meta_path = v3 / "land_surface_temperature" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"].insert(0, {"name": "numcodecs.pickle", "configuration": {}})
    meta_path.write_text(json.dumps(meta))
    line = assert_user_error(cli("prepare", "--cube", str(v3), cwd=tmp_path), "pickle")
    assert "'land_surface_temperature'" in line
    assert not marker.exists()


def test_pickle_codec_refused_on_a_remote_store(tmp_path):
    """The same check reads a remote store's metadata through fsspec (memory:// here)."""
    import fsspec

    from cubebench.cube import open_cube
    from cubebench.errors import CubeError

    marker = tmp_path / "unpickled"
    local = pickle_store(tmp_path / "evil.zarr", marker, "land_surface_temperature")
    fs = fsspec.filesystem("memory")
    fs.put(str(local), "/cubebench-untrusted/evil.zarr", recursive=True)
    try:
        with pytest.raises(CubeError, match=r"'land_surface_temperature'.*'pickle'"):
            open_cube("memory://cubebench-untrusted/evil.zarr")
    finally:
        fs.rm("/cubebench-untrusted", recursive=True)
    assert not marker.exists()


def test_harmless_store_opens(tmp_path):
    """The check refuses only code-running codecs: a plain cube still prepares."""
    cube = good_cube(tmp_path / "ok.zarr")
    proc = cli("prepare", "--cube", str(cube), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["samples"]["train"] > 0


# --- a results directory is data ------------------------------------------------------------


def plant(directory: Path, marker: Path, names: list[str]) -> None:
    """Python files (and a pickle) that leave `marker` behind if anything runs them."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text(payload(marker))
    (directory / "results.pkl").write_bytes(pickle.dumps(Exploit(marker)))
    (directory / "torch-mlp.pkl").write_bytes(pickle.dumps(Exploit(marker)))


PLANTED = ["report.py", "sitecustomize.py", "usercustomize.py", "torch_mlp.py", "mean.py"]


@pytest.mark.slow
def test_report_and_sync_run_nothing_from_the_results_dir(tmp_path):
    marker = tmp_path / "ran"
    results = tmp_path / "results"
    run_dir = _write_run(results / "planted", [_mlp()])
    plant(run_dir, marker, PLANTED)
    plant(results, marker, PLANTED)
    (run_dir / "__init__.py").write_text(payload(marker))

    report = cli("report", str(run_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert (run_dir / "report.md").is_file()
    # from inside the run dir too (the CLI as a console script does not put "" on sys.path)
    inside = subprocess.run(
        [sys.executable, "-P", "-m", "cubebench", "report", "."],
        capture_output=True,
        text=True,
        cwd=run_dir,
        timeout=300,
    )
    assert inside.returncode == 0, inside.stderr

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    sync = subprocess.run(
        [sys.executable, "-m", "cubebench", "sync", str(run_dir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert sync.returncode == 0, sync.stderr
    assert "pushed 1 case(s)" in sync.stdout
    assert (results / "mlflow.db").is_file()
    assert not marker.exists(), marker.read_text()


# --- case files come from the cases directory only --------------------------------------------


def test_list_imports_only_the_cases_directory(tmp_path):
    marker = tmp_path / "ran"
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "a_mean.py").write_text(mean_case(name="mean"))
    (cases / "_helper.py").write_text(payload(marker))  # `_` files are helpers, not cases
    (cases / "notes.py.txt").write_text(payload(marker))
    (cases / "sub").mkdir()
    (cases / "sub" / "deep.py").write_text(payload(marker))
    plant(tmp_path, marker, ["b_case.py", "torch_mlp.py"])  # beside the cases dir, and in CWD
    proc = cli("list", "--cases-dir", str(cases), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [row["case"] for row in json.loads(proc.stdout)] == ["mean"]
    assert not marker.exists()


@pytest.mark.slow
def test_run_imports_no_case_from_cube_results_or_cwd(tmp_path):
    marker = tmp_path / "ran"
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "mean.py").write_text(mean_case(name="mean"))
    cube = good_cube(tmp_path / "cube" / "cube.zarr")
    out = tmp_path / "results"
    work = tmp_path / "work"
    for where in (cube, cube.parent, out, out / "r1", work):
        plant(where, marker, ["mean.py", "torch_mlp.py", "other_case.py", "report.py"])
    # modules the worker imports, shadowed in the directory the suite starts from
    plant(work, marker, ["numpy.py", "xarray.py", "cubebench.py"])
    # the run dir holds a case file named like the case itself, before the run starts
    proc = cli(
        "run",
        "--cube",
        str(cube),
        "--cases-dir",
        str(cases),
        "--out",
        str(out),
        "--run-id",
        "r2",
        "--no-tracking",
        "--threads",
        "1",
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "r2" / "mean.json").read_text())
    assert result["status"] == "ok", result["reason"]
    assert not marker.exists(), marker.read_text()
