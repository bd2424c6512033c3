"""`write_report`: Markdown and HTML tables, plots, and one-line errors for broken run dirs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from cubebench.errors import CubebenchError
from cubebench.report import fmt, results_table, write_report
from cubebench.results import validate

RUN_ID = "20250101T000000-abc123"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENVIRONMENT = {
    "python": "3.11.9",
    "implementation": "CPython",
    "platform": "Linux-6.1-x86_64",
    "packages": {"numpy": "2.1.0", "torch": "2.13.0", "scikit-learn": "1.6.1"},
    "cpu": {"model": "Test CPU @ 3.0GHz", "count": 2},
    "gpu": None,
    "threads": {"per_case": 2},
    "seed": 0,
    "git_sha": "0123456789abcdef",
    "image": {"digest": None, "lock_hash": None},
}


def _metrics(rmse: float, **extra) -> dict:
    return {
        "rmse": rmse,
        "mae": 1.2345,
        "r2": 0.98765,
        "bias": -0.04321,
        "n": 12345,
        "noise_floor_rmse": 1.5,
        "rmse_over_noise_floor": rmse / 1.5,
        "units": "K",
        "eval_part": "test",
        "by_predictor": {"model": {"rmse": rmse}},
        **extra,
    }


def _result(case: str, library: str = "torch", **overrides) -> dict:
    result = {
        "schema_version": 1,
        "run_id": RUN_ID,
        "case": case,
        "library": library,
        "library_version": "2.13.0",
        "task": "lst-from-t2m",
        "status": "ok",
        "reason": None,
        "device": "cpu",
        "params": {"epochs": 3},
        "seed": 0,
        "threads": 2,
        "started_at": "2025-01-01T00:00:00+00:00",
        "finished_at": "2025-01-01T00:01:00+00:00",
        "metrics": _metrics(1.61234),
        "timing": {"warmup_s": 0.5, "fit_s": 12.3456, "predict_s": 1.5, "total_s": 15.0},
        "throughput": {
            "train_samples_per_s": 123456.7,
            "predict_samples_per_s": 987654.3,
            "train_samples": 1524000,
        },
        "loading": {
            "stall_fraction": 0.123456,
            "stall_method": "measured",
            "read_amplification": 1.0,
            "chunks_decoded": 64,
            "bytes_read": 1000,
            "bytes_decoded": 4000,
            "decode_s": 0.7,
            "time_to_first_batch_s": 0.01,
        },
        "memory": {"peak_rss_mb": 456.789, "gpu_peak_mb": None},
        "epochs": [],
        "cube": {"spec": "synthetic:tiny", "fingerprint": "f00", "chunk_shape": [23, 23, 45]},
        "environment": ENVIRONMENT,
    }
    for key, value in overrides.items():
        result[key] = value
    validate(result)
    return result


def _mlp() -> dict:
    epochs = [
        {
            "epoch": i,
            "train_loss": 1.0 / (i + 1),
            "val_loss": 1.2 / (i + 1),
            "seconds": 4.0,
            "samples": 508000,
        }
        for i in range(3)
    ]
    return _result("torch-mlp", epochs=epochs)


def _transfer() -> dict:
    by_predictor = {
        "fine_tuned": {"rmse": 1.71234},
        "source_only": {"rmse": 2.56789},
        "scratch": {"rmse": 2.01234},
    }
    metrics = _metrics(1.71234, by_predictor=by_predictor, transfer_gain=0.149076)
    loading = {**_result("x")["loading"], "stall_fraction": 0.25, "stall_method": "estimated"}
    return _result(
        "keras-transfer",
        library="keras",
        task="lst-from-t2m-transfer",
        metrics=metrics,
        loading=loading,
        throughput={"train_samples_per_s": 45678.9, "predict_samples_per_s": None},
    )


def _failed(reason: str = "timed out after 5 s") -> dict:
    return _result(
        "sklearn-sgd",
        library="scikit-learn",
        status="failed",
        reason=reason,
        metrics=None,
        timing={"warmup_s": 0.2, "fit_s": None, "predict_s": None, "total_s": 5.0},
        throughput={"train_samples_per_s": None, "predict_samples_per_s": None},
        loading={"stall_fraction": None, "read_amplification": None},
        memory={"peak_rss_mb": None},
    )


def _write_run(run_dir: Path, results: list[dict], environment: dict | None = ENVIRONMENT) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "run_id": RUN_ID,
        "cube": "synthetic:tiny",
        "cases": [r["case"] for r in results],
        "started_at": "2025-01-01T00:00:00+00:00",
        "finished_at": "2025-01-01T00:05:00+00:00",
        "device": "cpu",
        "epochs": None,
    }
    (run_dir / "run.json").write_text(json.dumps(manifest))
    if environment is not None:
        (run_dir / "environment.json").write_text(json.dumps(environment))
    for result in results:
        (run_dir / f"{result['case']}.json").write_text(json.dumps(result))
    return run_dir


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """The main table of report.md: {case: cells} (the first table after '## Cases')."""
    section = markdown.split("## Cases", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return _write_run(tmp_path / RUN_ID, [_mlp(), _transfer(), _failed()])


def test_report_files(run: Path):
    written = write_report(run)
    names = {p.name for p in written}
    assert names == {
        "report.md",
        "report.html",
        "accuracy_vs_throughput.png",
        "loading_vs_compute.png",
        "loss_curves.png",
    }
    for path in written:
        assert path.parent == run and path.is_file()
        if path.suffix == ".png":
            data = path.read_bytes()
            assert data.startswith(PNG_MAGIC), path.name
            assert len(data) > 5000, path.name


def test_markdown_table(run: Path):
    write_report(run)
    text = (run / "report.md").read_text()
    assert RUN_ID in text.splitlines()[0]
    assert "synthetic:tiny" in text and "cpu" in text
    rows = _table_rows(text)
    assert list(rows) == ["torch-mlp", "keras-transfer", "sklearn-sgd"]
    mlp, transfer, failed = rows["torch-mlp"], rows["keras-transfer"], rows["sklearn-sgd"]
    assert failed["status"] == "failed: timed out after 5 s"
    assert mlp["status"] == "ok" and mlp["library"] == "torch 2.13.0"
    # numbers as displayed: 3 significant digits, missing as a dash
    assert mlp["RMSE [K]"] == "1.61" and float(mlp["RMSE [K]"]) == round(1.61234, 2)
    assert mlp["RMSE / noise floor"] == "1.07"
    assert mlp["MAE [K]"] == "1.23"
    assert mlp["R²"] == "0.988"
    assert mlp["bias [K]"] == "-0.0432"
    assert mlp["train samples/s"] == "123,000"
    assert mlp["predict samples/s"] == "988,000"
    assert mlp["fit s"] == "12.3"
    assert mlp["stall %"] == "12.3"
    assert mlp["read ampl."] == "1.00"
    assert mlp["peak RSS MB"] == "457"
    assert transfer["stall %"] == "~25.0"  # estimated, marked
    assert transfer["predict samples/s"] == "—"
    for key in ("RMSE [K]", "train samples/s", "fit s", "stall %", "peak RSS MB"):
        assert failed[key] == "—"
    # every numeric cell is the raw value rounded to what is shown
    table = results_table([_mlp()])[0]
    for key, header in (("rmse", "RMSE [K]"), ("mae", "MAE [K]"), ("fit_s", "fit s")):
        shown = float(mlp[header].replace(",", ""))
        assert shown == pytest.approx(float(f"{table[key]:.3g}"))


def test_transfer_table_and_environment(run: Path):
    write_report(run)
    text = (run / "report.md").read_text()
    section = text.split("## Transfer learning", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if "keras-transfer" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["keras-transfer", "1.71", "2.57", "2.01", "0.149"]
    assert "torch-mlp" not in section  # one predictor: no transfer row
    assert "Test CPU @ 3.0GHz" in text and "0123456789abcdef" in text
    assert "torch 2.13.0" in text.split("## Environment", 1)[1]
    for png in ("accuracy_vs_throughput.png", "loading_vs_compute.png", "loss_curves.png"):
        assert f"]({png})" in text


def test_html_escapes_results(tmp_path: Path):
    evil = _failed("<script>alert(1)</script> & more")
    run = _write_run(tmp_path / "run", [_mlp(), evil])
    write_report(run)
    page = (run / "report.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert page.count("data:image/png;base64,") == 3
    assert "torch-mlp" in page and "sklearn-sgd" in page
    assert "<script>" not in (run / "report.md").read_text()


def test_single_case_and_no_plottable_case(tmp_path: Path):
    one = _write_run(tmp_path / "one", [_mlp()])
    assert len(write_report(one)) == 5
    only_failed = _write_run(tmp_path / "failed", [_failed()], environment=None)
    for path in write_report(only_failed):
        assert path.stat().st_size > 0
    text = (only_failed / "report.md").read_text()
    assert "failed: timed out after 5 s" in text
    assert "Test CPU" in text  # environment taken from the result when the file is missing


def test_missing_result_listed(tmp_path: Path):
    run = _write_run(tmp_path / "run", [_mlp()])
    manifest = json.loads((run / "run.json").read_text())
    manifest["cases"].append("torch-lstm")
    (run / "run.json").write_text(json.dumps(manifest))
    write_report(run)
    rows = _table_rows((run / "report.md").read_text())
    assert rows["torch-lstm"]["status"] == "missing: no result file"


def test_long_multiline_reason_is_one_short_line(tmp_path: Path):
    reason = "Traceback (most recent call last):\n" + "  File x | line 1\n" * 20 + "Boom"
    run = _write_run(tmp_path / "run", [_failed(reason)])
    write_report(run)
    rows = _table_rows((run / "report.md").read_text())
    status = rows["sklearn-sgd"]["status"]
    assert status.startswith("failed: Traceback") and status.endswith("…")
    assert len(status) < 100


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "—"),
        (float("nan"), "—"),
        (0, "0"),
        (1.23456, "1.23"),
        (9.996, "10.0"),
        (0.0123456, "0.0123"),
        (-0.04321, "-0.0432"),
        (999.6, "1,000"),
        (123456.7, "123,000"),
        (0.00001234, "1.23e-05"),
    ],
)
def test_fmt(value, shown):
    assert fmt(value) == shown


def _one_line_error(run: Path, *names: str) -> str:
    with pytest.raises(CubebenchError) as caught:
        write_report(run)
    message = str(caught.value)
    assert "\n" not in message
    assert any(name in message for name in names), message
    return message


def test_bad_json_result(tmp_path: Path):
    run = _write_run(tmp_path / "run", [_mlp()])
    (run / "torch-mlp.json").write_text('{"case": "torch-mlp", ')
    _one_line_error(run, "torch-mlp.json")


def test_result_without_status(tmp_path: Path):
    broken = copy.deepcopy(_mlp())
    del broken["status"]
    run = _write_run(tmp_path / "run", [_mlp(), _transfer()])
    (run / "torch-mlp.json").write_text(json.dumps(broken))
    message = _one_line_error(run, "torch-mlp")
    assert "status" in message


def test_not_a_run(tmp_path: Path):
    _one_line_error(tmp_path / "nowhere", "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(empty, "run.json")
    (empty / "run.json").write_text("[1, 2]")
    _one_line_error(empty, "run.json")
