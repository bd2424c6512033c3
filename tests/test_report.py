"""`write_report`: per-task Markdown and HTML tables, aggregation over repeats, comparisons,
plots, summary.json, version 1 runs, and one-line errors for broken run dirs."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sp

from cubebench.errors import CubebenchError
from cubebench.report import (
    LOADING_PNG,
    LOSS_PNG,
    PLOTS,
    SUMMARY_JSON,
    RunResults,
    aggregate_table,
    comparison_table,
    fmt,
    plot_name,
    results_table,
    write_report,
)
from cubebench.results import load_run, result_name, validate

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
PIXELS, TRANSFER, GAPFILL = "lst-from-t2m", "lst-from-t2m-transfer", "lst-gapfill"
FLOOR = 1.5


def _metrics(rmse: float, **extra) -> dict:
    return {
        "rmse": rmse,
        "mae": 1.2345,
        "r2": 0.98765,
        "bias": -0.04321,
        "n": 12345,
        "noise_floor_rmse": FLOOR,
        "noise_floor_nominal": FLOOR,
        "noise_floor_source": "realised",
        "rmse_over_noise_floor": rmse / FLOOR,
        "units": "K",
        "eval_part": "test",
        "by_predictor": {"model": {"rmse": rmse}},
        **extra,
    }


def _result(case: str, library: str = "torch", repeat: int = 0, **overrides) -> dict:
    """A version 2 result, validated; `seed` follows the repeat as in `run --repeat`."""
    result = {
        "schema_version": 2,
        "run_id": RUN_ID,
        "case": case,
        "library": library,
        "library_version": "2.13.0",
        "task": PIXELS,
        "status": "ok",
        "reason": None,
        "device": "cpu",
        "params": {"epochs": 3},
        "seed": repeat,
        "split_seed": 0,
        "repeat": repeat,
        "threads": 2,
        "world_size": 1,
        "started_at": "2025-01-01T00:00:00+00:00",
        "finished_at": "2025-01-01T00:01:00+00:00",
        "metrics": _metrics(1.61234),
        "timing": {
            "prepare_s": 0.3,
            "warmup_s": 0.5,
            "fit_s": 12.3456,
            "probe_s": 0.4,
            "predict_s": 1.5,
            "total_s": 15.0,
        },
        "throughput": {
            "train_samples_per_s": 123456.7,
            "predict_samples_per_s": 987654.3,
            "train_samples": 1524000,
        },
        "loading": {
            "stall_fraction": 0.123456,
            "stall_ci95": 0.00812,
            "stall_method": "resident-steps",
            "wait_fraction": 0.05,
            "read_amplification": 1.0,
            "chunks_decoded": 64,
            "bytes_read": 1000,
            "bytes_decoded": 4000,
            "decode_s": 0.7,
            "time_to_first_batch_s": 0.01,
        },
        "time_to_quality": {
            "target_rmse": 1.1 * FLOOR,
            "seconds": 8.0,
            "samples": 1016000,
            "epoch": 1,
        },
        "memory": {"peak_rss_mb": 456.789, "gpu_peak_mb": None},
        "epochs": [],
        "cube": {"spec": "synthetic:tiny", "fingerprint": "f00", "chunk_shape": [23, 23, 45]},
        "environment": ENVIRONMENT,
    }
    result.update(overrides)
    validate(result)
    return result


def _with(result: dict, **changes) -> dict:
    """A copy of `result` with dotted keys changed ("metrics.rmse": 1.7), validated."""
    out = copy.deepcopy(result)
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        target = out
        for key in path:
            target = target[key]
        target[last] = value
    if "metrics.rmse" in changes:
        out["metrics"]["rmse_over_noise_floor"] = changes["metrics.rmse"] / FLOOR
    validate(out)
    return out


def _mlp(repeat: int = 0) -> dict:
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
    return _result("torch-mlp", repeat=repeat, epochs=epochs)


RMSE_FINETUNED, RMSE_SOURCE_ONLY, RMSE_SCRATCH = 1.71234, 2.56789, 2.01234


def _transfer() -> dict:
    """The transfer case as the cases write it: predictors finetuned (its own result),
    source_only and scratch; transfer gain = RMSE scratch / RMSE finetuned."""
    by_predictor = {
        "finetuned": {"rmse": RMSE_FINETUNED},
        "source_only": {"rmse": RMSE_SOURCE_ONLY},
        "scratch": {"rmse": RMSE_SCRATCH},
    }
    metrics = _metrics(
        RMSE_FINETUNED, by_predictor=by_predictor, transfer_gain=RMSE_SCRATCH / RMSE_FINETUNED
    )
    loading = {**_result("x")["loading"], "stall_fraction": 0.25, "wait_fraction": None}
    return _result(
        "keras-transfer",
        library="keras",
        task=TRANSFER,
        metrics=metrics,
        loading=loading,
        throughput={
            "train_samples_per_s": 45678.9,
            "predict_samples_per_s": None,
            "train_samples": 900000,
        },
        time_to_quality={"target_rmse": 1.65, "seconds": None, "samples": None, "epoch": None},
    )


def _gapfill() -> dict:
    return _result(
        "torch-cnn",
        task=GAPFILL,
        throughput={
            "train_samples_per_s": 812.5,
            "predict_samples_per_s": 4000.0,
            "train_samples": 9000,
        },
        time_to_quality=None,
    )


def _failed(
    reason: str = "timed out after 5 s", case: str = "sklearn-sgd", repeat: int = 0
) -> dict:
    return _result(
        case,
        library="scikit-learn",
        repeat=repeat,
        status="failed",
        reason=reason,
        metrics=None,
        timing={
            "prepare_s": 0.1,
            "warmup_s": 0.2,
            "fit_s": None,
            "probe_s": None,
            "predict_s": None,
            "total_s": 5.0,
        },
        throughput={
            "train_samples_per_s": None,
            "predict_samples_per_s": None,
            "train_samples": None,
        },
        loading={
            "stall_fraction": None,
            "stall_ci95": None,
            "stall_method": None,
            "wait_fraction": None,
            "read_amplification": None,
        },
        time_to_quality=None,
        memory={"peak_rss_mb": None, "gpu_peak_mb": None},
    )


def _write_run(
    run_dir: Path,
    results: list[dict],
    environment: dict | None = ENVIRONMENT,
    repeat: int | None = None,
) -> Path:
    """A run directory as `cubebench run` leaves it: run.json (cases in first-seen order,
    `repeat`: the most repeats any case has unless given), environment.json, result files."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cases = list(dict.fromkeys(r["case"] for r in results))
    manifest = {
        "run_id": RUN_ID,
        "cube": "synthetic:tiny",
        "cases": cases,
        "started_at": "2025-01-01T00:00:00+00:00",
        "finished_at": "2025-01-01T00:05:00+00:00",
        "device": "cpu",
        "epochs": None,
        "seed": 0,
        "repeat": repeat or max((r.get("repeat", 0) + 1 for r in results), default=1),
        "vary_split": False,
    }
    (run_dir / "run.json").write_text(json.dumps(manifest))
    if environment is not None:
        (run_dir / "environment.json").write_text(json.dumps(environment))
    for result in results:
        name = result_name(result["case"], result.get("repeat", 0))
        (run_dir / f"{name}.json").write_text(json.dumps(result))
    return run_dir


def _section(markdown: str, title: str) -> str:
    """The text of one `## title` section of report.md."""
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _table(text: str, after: str | None = None) -> dict[str, dict[str, str]]:
    """The first Markdown table in `text` (after the line `after`): {first cell: {header: cell}}."""
    if after:
        text = text.split(after, 1)[1]
    lines = []
    for line in text.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]  # noqa: E731
    header = split(lines[0])
    rows = {}
    for line in lines[2:]:
        cells = split(line)
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def _task_table(markdown: str, task: str) -> dict[str, dict[str, str]]:
    return _table(_section(markdown, f"Task: {task}"))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return _write_run(tmp_path / RUN_ID, [_mlp(), _transfer(), _failed()])


def _pngs(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.glob("*.png")}


def test_report_files(run: Path):
    written = write_report(run)
    names = {p.name for p in written}
    assert names == {
        "report.md",
        "report.html",
        "summary.json",
        *PLOTS,
        plot_name(PIXELS),
        plot_name(TRANSFER),
    }
    assert plot_name(PIXELS) == "accuracy_vs_throughput-lst-from-t2m.png"
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
    pixels = _task_table(text, PIXELS)
    assert list(pixels) == ["torch-mlp", "sklearn-sgd"]  # the transfer case has its own task
    assert list(_task_table(text, TRANSFER)) == ["keras-transfer"]
    mlp, failed = pixels["torch-mlp"], pixels["sklearn-sgd"]
    transfer = _task_table(text, TRANSFER)["keras-transfer"]
    assert failed["status"] == "failed: timed out after 5 s"
    assert mlp["status"] == "ok" and mlp["library"] == "torch 2.13.0"
    # numbers as displayed: 3 significant digits, missing as a dash; one run: no interval
    assert mlp["RMSE [K]"] == "1.61" and float(mlp["RMSE [K]"]) == round(1.61234, 2)
    assert mlp["RMSE / noise floor"] == "1.07"
    assert mlp["MAE [K]"] == "1.23"
    assert mlp["R²"] == "0.988"
    assert mlp["bias [K]"] == "-0.0432"
    assert mlp["train samples/s"] == "123,000"
    assert mlp["predict samples/s"] == "988,000"
    assert mlp["fit s"] == "12.3"
    assert mlp["stall %"] == "12.3 ± 0.812"  # one run: the measurement's own interval
    assert mlp["wait %"] == "5.00"
    assert mlp["read ampl."] == "1.00"
    assert mlp["time to 1.1× floor [s]"] == "8.00"
    assert mlp["peak RSS MB"] == "457"
    assert transfer["predict samples/s"] == "—"
    assert transfer["wait %"] == "—"  # a Keras loop: no direct measurement
    assert transfer["time to 1.1× floor [s]"] == "never"
    for key in ("RMSE [K]", "train samples/s", "fit s", "stall %", "peak RSS MB"):
        assert failed[key] == "—"
    # every numeric cell is the raw value rounded to what is shown
    table = results_table([_mlp()])[0]
    for key, header in (("rmse", "RMSE [K]"), ("mae", "MAE [K]"), ("fit_s", "fit s")):
        shown = float(mlp[header].replace(",", ""))
        assert shown == pytest.approx(float(f"{table[key]:.3g}"))
    # the legends say what the numbers are
    section = _section(text, f"Task: {PIXELS}")
    assert "Single run, no interval" in section
    assert (
        "stall = training-loop time minus the compute time of the same steps on resident "
        "batches, over the fit time; can be negative within its interval" in section
    )
    assert "wait % (a separate column) = time measured inside next(batch)" in section
    assert "read ampl. = decoded bytes / bytes of the cells the part covers" in section


def test_transfer_table_and_environment(run: Path):
    write_report(run)
    text = (run / "report.md").read_text()
    section = _section(text, f"Task: {TRANSFER}")
    rows = _table(section, "### Transfer learning")
    assert list(rows["keras-transfer"]) == [
        "case",
        "RMSE finetuned [K]",
        "RMSE source_only [K]",
        "RMSE scratch [K]",
        "transfer gain",
    ]
    assert list(rows["keras-transfer"].values()) == [
        "keras-transfer",
        "1.71",
        "2.57",
        "2.01",
        "1.18",
    ]
    assert float(rows["keras-transfer"]["transfer gain"]) == pytest.approx(
        RMSE_SCRATCH / RMSE_FINETUNED, abs=0.005
    )
    assert "Transfer learning" not in _section(text, f"Task: {PIXELS}")  # one predictor
    assert "Test CPU @ 3.0GHz" in text and "0123456789abcdef" in text
    assert "torch 2.13.0" in text.split("## Environment", 1)[1]
    for png in (LOADING_PNG, LOSS_PNG, plot_name(PIXELS), plot_name(TRANSFER)):
        assert f"]({png})" in text


def test_html_escapes_results(tmp_path: Path):
    evil = _failed("<script>alert(1)</script> & more")
    run = _write_run(tmp_path / "run", [_mlp(), evil])
    write_report(run)
    page = (run / "report.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert page.count("data:image/png;base64,") == 3  # the task's plot, loading, losses
    assert "torch-mlp" in page and "sklearn-sgd" in page
    assert "<script>" not in (run / "report.md").read_text()


def test_single_case_and_no_plottable_case(tmp_path: Path):
    one = _write_run(tmp_path / "one", [_mlp()])
    assert len(write_report(one)) == 3 + len(PLOTS) + 1  # documents, run plots, one task
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
    text = (run / "report.md").read_text()
    rows = _table(_section(text, "Cases without a result"))
    assert rows["torch-lstm"]["status"] == "missing: no result file"
    assert json.loads((run / SUMMARY_JSON).read_text())["missing_cases"] == ["torch-lstm"]


def test_long_multiline_reason_is_one_short_line(tmp_path: Path):
    reason = "Traceback (most recent call last):\n" + "  File x | line 1\n" * 20 + "Boom"
    run = _write_run(tmp_path / "run", [_failed(reason)])
    write_report(run)
    rows = _task_table((run / "report.md").read_text(), PIXELS)
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


# --------------------------------------------------------------------------------------------
# repeats


RMSES = [1.60, 1.72, 1.65]
SPEEDS = [120000.0, 131000.0, 118500.0]
FITS = [12.0, 11.1, 12.9]
STALLS = [0.10, -0.02, 0.06]
TTQS = [8.0, 7.5, 9.1]


def _repeats(case: str = "torch-mlp", library: str = "torch", rmses=RMSES, speeds=SPEEDS) -> list:
    out = []
    for i, (rmse, speed, fit, stall, ttq) in enumerate(zip(rmses, speeds, FITS, STALLS, TTQS)):
        base = _result(case, library=library, repeat=i)
        out.append(
            _with(
                base,
                **{
                    "metrics.rmse": rmse,
                    "throughput.train_samples_per_s": speed,
                    "timing.fit_s": fit,
                    "loading.stall_fraction": stall,
                    "time_to_quality.seconds": ttq,
                },
            )
        )
    return out


def _interval(values: list[float]) -> tuple[float, float, float]:
    x = np.asarray(values)
    sd = x.std(ddof=1)
    return x.mean(), sd, sp.t.ppf(0.975, len(x) - 1) * sd / math.sqrt(len(x))


def test_aggregation_equals_numpy(tmp_path: Path):
    (row,) = aggregate_table(_repeats(), repeats=3)
    assert row["n_ok"] == 3 and row["n_failed"] == 0 and row["status"] == "ok"
    for key, values in (
        ("rmse", RMSES),
        ("rmse_over_noise_floor", [v / FLOOR for v in RMSES]),
        ("train_samples_per_s", SPEEDS),
        ("fit_s", FITS),
        ("stall_fraction", STALLS),
        ("ttq_seconds", TTQS),
    ):
        mean, sd, half = _interval(values)
        assert row[key] == pytest.approx(mean), key
        assert row[f"{key}_sd"] == pytest.approx(sd), key
        assert row[f"{key}_half_width"] == pytest.approx(half), key
        assert row[f"{key}_ci95_low"] == pytest.approx(mean - half), key
        assert row[f"{key}_n"] == 3
    # shown as mean ± half width; the stall as it is, negative repeats included
    run = _write_run(tmp_path / "run", _repeats())
    write_report(run)
    text = (run / "report.md").read_text()
    mlp = _task_table(text, PIXELS)["torch-mlp"]
    mean, _, half = _interval(RMSES)
    assert mlp["RMSE [K]"] == f"{fmt(mean)} ± {fmt(half)}"
    assert mlp["status"] == "ok (3 of 3)"
    mean, _, half = _interval([100 * s for s in STALLS])
    assert mlp["stall %"] == f"{fmt(mean)} ± {fmt(half)}"
    mean, _, half = _interval(TTQS)
    assert mlp["time to 1.1× floor [s]"] == f"{fmt(mean)} ± {fmt(half)}"
    assert "Single run" not in _section(text, f"Task: {PIXELS}")
    assert "95 % interval (Student t) over the ok repeats" in text


def test_negative_stall_shown_as_it_is(tmp_path: Path):
    negative = _with(_mlp(), **{"loading.stall_fraction": -0.03, "loading.stall_ci95": 0.05})
    run = _write_run(tmp_path / "run", [negative])
    write_report(run)  # the loading plot draws it past the fit's end
    mlp = _task_table((run / "report.md").read_text(), PIXELS)["torch-mlp"]
    assert mlp["stall %"] == "-3.00 ± 5.00"
    (row,) = aggregate_table([negative])
    assert row["fit_wait_s"] == pytest.approx(-0.03 * 12.3456)  # not clamped to 0


def test_failed_repeat_counted_not_averaged(tmp_path: Path):
    runs = _repeats()
    # a failed repeat that still carries numbers: none of them may reach the mean
    broken = _with(_failed("out of memory", case="torch-mlp", repeat=1), library="torch")
    broken["metrics"] = _metrics(99.0)
    validate(broken)
    runs[1] = broken
    (row,) = aggregate_table(runs, repeats=3)
    assert row["n_ok"] == 2 and row["n_failed"] == 1 and row["status"] == "partial"
    assert row["rmse"] == pytest.approx(np.mean([RMSES[0], RMSES[2]]))
    assert row["failed"] == [{"repeat": 1, "seed": 1, "reason": "out of memory"}]
    run = _write_run(tmp_path / "run", runs)
    write_report(run)
    status = _task_table((run / "report.md").read_text(), PIXELS)["torch-mlp"]["status"]
    assert status == "ok (2 of 3); repeat 1 failed: out of memory"
    case = json.loads((run / SUMMARY_JSON).read_text())["tasks"][PIXELS]["cases"]["torch-mlp"]
    assert (case["n_ok"], case["n_failed"]) == (2, 1)
    # a repeat with no file at all is named as missing
    (row,) = aggregate_table([runs[0], runs[2]], repeats=3)
    assert row["missing"] == [1] and row["status"] == "partial"


def test_time_to_quality_only_when_every_repeat_reached():
    runs = _repeats()
    runs[2] = _with(runs[2], **{"time_to_quality.seconds": None})
    (row,) = aggregate_table(runs)
    assert row["ttq_seconds"] is None and row["ttq_reached"] == 2
    from cubebench.report.render import ttq_text

    assert ttq_text(row) == "2 of 3 only"


def _twins(tmp_path: Path, keras_rmses: list[float], keras_speeds: list[float]) -> Path:
    torch = _repeats(rmses=RMSES, speeds=SPEEDS)
    keras = _repeats("keras-mlp", "keras", rmses=keras_rmses, speeds=keras_speeds)
    return _write_run(tmp_path / "run", torch + keras)


def test_significance_marked_for_a_clear_difference(tmp_path: Path):
    worse = [r + 0.5 for r in [1.61, 1.70, 1.66]]  # clearly worse, and the seeds match
    same_speed = [125000.0, 117000.0, 127000.0]  # drawn from the same spread as SPEEDS
    run = _twins(tmp_path, worse, same_speed)
    rows = {c["metric"]: c for c in comparison_table(load_run(run)[1])}
    rmse, speed = rows["rmse"], rows["train_samples_per_s"]
    assert rmse["a"] == "torch-mlp" and rmse["b"] == "keras-mlp" and rmse["twin"]
    assert rmse["test"] == "paired"
    assert rmse["difference"] == pytest.approx(np.mean(RMSES) - np.mean(worse))
    assert rmse["p"] == pytest.approx(sp.ttest_rel(RMSES, worse).pvalue)
    assert rmse["significant"] is True and rmse["p_adjusted"] < 0.05
    assert speed["significant"] is False and speed["p_adjusted"] > 0.05
    write_report(run)
    text = (run / "report.md").read_text()
    significance = _section(text, f"Task: {PIXELS}").split("### Significance", 1)[1]
    lines = [line for line in significance.splitlines() if line.startswith("| torch-mlp")]
    assert len(lines) == 2
    rmse_line = next(line for line in lines if "RMSE" in line)
    speed_line = next(line for line in lines if "samples/s" in line)
    assert "yes ✱" in rmse_line and "paired t" in rmse_line
    assert speed_line.rstrip(" |").split("|")[-1].strip() == "no"


def test_no_significance_for_identical_distributions(tmp_path: Path):
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.6, 0.05, 6), rng.normal(1.6, 0.05, 6)
    torch = [
        _with(_result("torch-mlp", repeat=i), **{"metrics.rmse": float(v)}) for i, v in enumerate(a)
    ]
    keras = [
        _with(_result("keras-mlp", "keras", repeat=i, seed=100 + i), **{"metrics.rmse": float(v)})
        for i, v in enumerate(b)
    ]
    rows = [c for c in comparison_table(torch + keras) if c["metric"] == "rmse"]
    (row,) = rows
    assert row["test"] == "welch"  # other seeds: not paired
    assert row["p"] == pytest.approx(sp.ttest_ind(a, b, equal_var=False).pvalue)
    assert row["significant"] is False


def test_holm_within_task_and_metric(tmp_path: Path):
    sgd = _repeats("sklearn-sgd", "scikit-learn", rmses=[2.1, 2.2, 2.15])
    keras = _repeats("keras-mlp", "keras", rmses=[1.7, 1.8, 1.72])
    rows = [c for c in comparison_table(_repeats() + keras + sgd) if c["metric"] == "rmse"]
    assert (rows[0]["a"], rows[0]["b"]) == ("torch-mlp", "keras-mlp")  # twins first
    assert len(rows) == 3  # every pair of different libraries
    ranked = sorted(rows, key=lambda c: c["p"])
    m = len(ranked)
    expected, running = [], 0.0
    for i, c in enumerate(ranked):
        running = max(running, min(1.0, (m - i) * c["p"]))
        expected.append(running)
    assert [c["p_adjusted"] for c in ranked] == pytest.approx(expected)


def test_one_repeat_says_so(run: Path):
    write_report(run)
    section = _section((run / "report.md").read_text(), f"Task: {PIXELS}")
    significance = section.split("### Significance", 1)[1].split("###", 1)[0]
    assert "One repeat per case: no interval and no significance test" in significance
    assert "| torch-mlp" not in significance


def test_one_plot_per_task(tmp_path: Path):
    run = _write_run(tmp_path / "run", [_mlp(), _transfer(), _gapfill(), _failed()])
    write_report(run)
    per_task = {p for p in _pngs(run) if p.startswith("accuracy_vs_throughput-")}
    assert per_task == {plot_name(PIXELS), plot_name(TRANSFER), plot_name(GAPFILL)}
    text = (run / "report.md").read_text()
    for task in (PIXELS, TRANSFER, GAPFILL):
        section = _section(text, f"Task: {task}")
        assert section.count("![accuracy_vs_throughput") == 1
        assert f"]({plot_name(task)})" in section
    assert "a sample is a window" in _section(text, f"Task: {GAPFILL}")
    assert "a sample is a pixel" in _section(text, f"Task: {PIXELS}")
    # nothing is ranked or compared across tasks
    assert "torch-cnn" not in _section(text, f"Task: {PIXELS}")


def test_plot_legend_not_annotations():
    """Cases are told apart by a legend outside the axes, not by labels next to the points."""
    from matplotlib.figure import Figure

    from cubebench.report.plots import _draw_accuracy

    rows = aggregate_table(_repeats() + _repeats("keras-mlp", "keras"))
    fig = Figure()
    ax = fig.add_subplot()
    _draw_accuracy(ax, rows, "pixel")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["torch-mlp (n=3)", "keras-mlp (n=3)"]
    assert not any("mlp" in t.get_text() for t in ax.texts)
    assert ax.get_legend().get_bbox_to_anchor().x0 > ax.bbox.x1 - 1  # right of the axes
    assert len(ax.containers) == 2  # one error bar container per case


def test_summary_json(tmp_path: Path):
    run = _twins(tmp_path, [r + 0.5 for r in RMSES], SPEEDS)
    write_report(run)
    summary = json.loads((run / SUMMARY_JSON).read_text())
    assert summary["run_id"] == RUN_ID and summary["repeat"] == 3 and summary["alpha"] == 0.05
    task = summary["tasks"][PIXELS]
    assert task["sample"] == "pixel" and task["plot"] == plot_name(PIXELS)
    assert list(task["cases"]) == ["torch-mlp", "keras-mlp"]
    case = task["cases"]["torch-mlp"]
    assert (case["n_ok"], case["n_failed"], case["n_missing"]) == (3, 0, 0)
    mean, sd, half = _interval(RMSES)
    assert case["rmse"]["mean"] == pytest.approx(mean)
    assert case["rmse"]["sd"] == pytest.approx(sd)
    assert case["rmse"]["half_width"] == pytest.approx(half)
    for key in ("rmse_over_noise_floor", "train_samples_per_s", "fit_s", "stall_fraction"):
        assert case[key]["n"] == 3
    assert case["time_to_quality_s"]["mean"] == pytest.approx(np.mean(TTQS))
    comparisons = {c["metric"]: c for c in task["comparisons"]}
    assert set(comparisons) == {"rmse", "train_samples_per_s"}
    rmse = comparisons["rmse"]
    assert {"a", "b", "p", "p_adjusted", "significant", "test", "difference"} <= set(rmse)
    assert rmse["significant"] is True and rmse["difference"] == pytest.approx(-0.5)
    assert comparisons["train_samples_per_s"]["p"] is None  # identical values: no test
    assert comparisons["train_samples_per_s"]["significant"] is None


def test_load_run_orders_cases_then_repeats(tmp_path: Path):
    runs = [_result("b-case", repeat=r) for r in (10, 2, 0, 1)] + [_result("a-case")]
    run = _write_run(tmp_path / "run", runs)
    (run / SUMMARY_JSON).write_text("{}")  # not a result
    manifest, results = load_run(run)
    assert [(r["case"], r["repeat"]) for r in results] == [
        ("b-case", 0),
        ("b-case", 1),
        ("b-case", 2),
        ("b-case", 10),
        ("a-case", 0),
    ]
    assert manifest["cases"] == ["b-case", "a-case"]


def test_run_results_notebook_api(tmp_path: Path):
    run = _write_run(tmp_path / "run", [*_repeats(), _transfer()])
    results = RunResults(run)
    assert results.cases == ["torch-mlp", "keras-transfer"]
    assert results.tasks == [PIXELS, TRANSFER]
    table = results.table()
    assert list(table.index) == ["torch-mlp", "keras-transfer"]
    assert table.loc["torch-mlp", "RMSE [K]"] == pytest.approx(np.mean(RMSES))
    assert table.loc["torch-mlp", "RMSE [K] ±"] == pytest.approx(_interval(RMSES)[2])
    raw = results.table(raw=True)
    for key in (
        "rmse_over_noise_floor",
        "fit_s",
        "stall_percent",
        "fit_wait_s",
        "read_amplification",
        "peak_rss_mb",
    ):
        assert key in raw.columns  # the columns notebooks/05 reads
    assert len(results.repeats_table()) == 4
    assert results.summary()["tasks"][PIXELS]["cases"]["torch-mlp"]["n_ok"] == 3
    assert list(results.transfer_frame().columns) == [
        "finetuned",
        "source_only",
        "scratch",
        "transfer_gain",
    ]
    for name in (*PLOTS, plot_name(PIXELS)):
        assert results.plot(name).startswith(PNG_MAGIC)
    with pytest.raises(KeyError):
        results.plot("nope.png")
    page = results._repr_html_()
    assert "Task: lst-from-t2m" in page and "torch-mlp" in page


# --------------------------------------------------------------------------------------------
# version 1 runs


def _v1(case: str, library: str = "torch", **overrides) -> dict:
    """A result as cubebench wrote it before repeats (schema version 1)."""
    result = {
        "schema_version": 1,
        "run_id": RUN_ID,
        "case": case,
        "library": library,
        "library_version": "2.13.0",
        "task": PIXELS,
        "status": "ok",
        "reason": None,
        "device": "cpu",
        "params": {"epochs": 3},
        "seed": 0,
        "threads": 2,
        "metrics": {k: v for k, v in _metrics(1.61234).items() if not k.startswith("noise_floor_")}
        | {"noise_floor_rmse": FLOOR},
        "timing": {"warmup_s": 0.5, "fit_s": 12.3456, "predict_s": 1.5, "total_s": 15.0},
        "throughput": {"train_samples_per_s": 123456.7, "predict_samples_per_s": 987654.3},
        "loading": {"stall_fraction": 0.25, "stall_method": "estimated", "read_amplification": 1.0},
        "memory": {"peak_rss_mb": 456.789},
        "epochs": [],
        "cube": {"spec": "synthetic:tiny", "fingerprint": "f00", "chunk_shape": [23, 23, 45]},
        "environment": ENVIRONMENT,
    }
    result.update(overrides)
    validate(result)
    return result


def test_v1_run_still_renders(tmp_path: Path):
    failed = _v1(
        "sklearn-sgd",
        library="scikit-learn",
        status="failed",
        reason="timed out after 5 s",
        metrics=None,
        loading={"stall_fraction": None, "read_amplification": None},
    )
    run = _write_run(tmp_path / "old", [_v1("torch-mlp"), failed])
    manifest = json.loads((run / "run.json").read_text())
    for key in ("repeat", "vary_split", "seed"):  # not in manifests of that time
        del manifest[key]
    (run / "run.json").write_text(json.dumps(manifest))
    write_report(run)
    rows = _task_table((run / "report.md").read_text(), PIXELS)
    assert rows["torch-mlp"]["RMSE [K]"] == "1.61"
    assert rows["torch-mlp"]["stall %"] == "~25.0"  # estimated then, and marked
    assert rows["torch-mlp"]["time to 1.1× floor [s]"] == "—"  # not measured then
    assert rows["sklearn-sgd"]["status"] == "failed: timed out after 5 s"
    assert _pngs(run) >= {*PLOTS, plot_name(PIXELS)}
    assert json.loads((run / SUMMARY_JSON).read_text())["repeat"] == 1


def test_validate_versions():
    validate(_v1("torch-mlp"))
    validate(_mlp())
    for version in (3, 0, None, "2", True, [2]):
        bad = {**_mlp(), "schema_version": version}
        with pytest.raises(CubebenchError) as caught:
            validate(bad, "x.json")
        assert "unknown schema_version" in str(caught.value) and "\n" not in str(caught.value)
    v2_as_v1 = {**_mlp(), "schema_version": 1, "loading": {**_mlp()["loading"]}}
    with pytest.raises(CubebenchError, match="stall_method"):  # "resident-steps" is v2 only
        validate(v2_as_v1)


# --------------------------------------------------------------------------------------------
# broken run directories


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


def test_bad_json_repeat(tmp_path: Path):
    run = _write_run(tmp_path / "run", [_mlp(), _mlp(1)])
    (run / "torch-mlp@1.json").write_text("[")
    _one_line_error(run, "torch-mlp@1.json")


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
