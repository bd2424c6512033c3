"""The one measurement path (`cubebench.measure.run_case`): what it books as warm-up, fit and
probe; one stall definition for every library, validated against the directly measured wait
and never clamped; the floor realised on the evaluated pixels; time to quality; and failed
results that carry every key."""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import numpy as np
import pytest

from cubebench import results
from cubebench.case import Case, EpochRecord
from cubebench.cube.synthetic import lst_oracle
from cubebench.discovery import discover
from cubebench.measure import QUALITY_FACTOR, run_case, time_to_quality

ENV = results.environment_manifest(2, 0)
LOADER_DELAY = 0.02  # s per batch: a loader this slow is most of a 30 ms step
STEP_SECONDS = 0.01


def _measure(cls, task, **options) -> dict:
    measured = run_case(
        cls, task.cube, run_id="test", environment=ENV, task=task, threads=1, **options
    )
    results.validate(measured.result)
    return measured.result


class SleepyCase(Case):
    """A loop of known costs: each batch takes LOADER_DELAY to arrive and STEP_SECONDS to
    learn; the resident probe's step takes `probe_step_s`. Predicts the train mean."""

    name = "sleepy"
    library = "numpy"
    parameters: ClassVar[dict[str, Any]] = {
        "epochs": 2,
        "batch_size": 512,
        "warmup_sleep_s": 0.0,
        "probe_step_s": STEP_SECONDS,
    }

    def fit(self) -> None:
        context, p = self.context, self.params
        with context.phase("warmup"):
            time.sleep(p["warmup_sleep_s"])
        stream = context.stream("train")
        real = stream.batches

        def slow(epoch):  # the loader: a known wait inside next(batch)
            for batch in real(epoch):
                time.sleep(LOADER_DELAY)
                yield batch

        stream.batches = slow
        resident = context.resident_batches(stream)
        planned = p["epochs"] * stream.steps_per_epoch()
        probe_step = lambda b: time.sleep(p["probe_step_s"])  # noqa: E731
        with context.probing(probe_step, resident, planned_steps=planned):
            for epoch in range(p["epochs"]):
                n = 0
                for _x, y in context.timed_batches(stream, epoch):
                    time.sleep(STEP_SECONDS)
                    n += len(y)
                context.log_epoch(epoch, 1.0, 1.0, seconds=0.0, samples=n, of=p["epochs"])

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.zeros(len(x))


def test_the_estimated_stall_agrees_with_the_measured_wait(tiny_task):
    result = _measure(SleepyCase, tiny_task)
    loading = result["loading"]
    # most of every step is the loader's: both methods see it, within the estimate's interval
    assert loading["wait_fraction"] > 0.4
    assert abs(loading["stall_fraction"] - loading["wait_fraction"]) <= max(
        0.05, loading["stall_ci95"]
    )
    assert loading["compute_step_s"] == pytest.approx(STEP_SECONDS, rel=0.5)
    assert loading["stall_method"] == "resident-steps"


def test_a_negative_stall_is_reported_as_it_is(tiny_task):
    """A probe step slower than the loop's step (nothing a real case does on purpose, but a
    noisy machine can): the estimate is negative, with its interval, and not clamped to 0."""
    result = _measure(SleepyCase, tiny_task, params={"probe_step_s": 0.1})
    stall = result["loading"]["stall_fraction"]
    assert stall < -0.5  # 0.03 s a step in the loop, 0.1 s a step on resident batches


def test_warm_up_and_probe_are_not_fit_time(tiny_task):
    result = _measure(SleepyCase, tiny_task, params={"warmup_sleep_s": 1.0})
    timing = result["timing"]
    assert timing["warmup_s"] >= 1.0
    assert timing["probe_s"] > 0
    # the fit is the loop and its epochs: (steps x (delay + step)), not the sleep nor the probe
    steps = result["loading"]["steps"]
    assert timing["fit_s"] == pytest.approx(result["loading"]["train_loop_s"], abs=0.5)
    assert timing["fit_s"] >= steps * (LOADER_DELAY + STEP_SECONDS)
    assert timing["fit_s"] < 1.0 + steps * (LOADER_DELAY + STEP_SECONDS)


def test_keras_compile_and_tracing_are_warm_up(tiny_task, monkeypatch):
    """A compile that takes a known 3 s lands in warm-up, and the fit is its epochs."""
    from cubebench.models import keras as km

    compile_model = km.compile_model

    def slow_compile(*args, **kwargs):
        time.sleep(3.0)
        return compile_model(*args, **kwargs)

    monkeypatch.setattr(km, "compile_model", slow_compile)
    cls = discover()["keras-mlp"][1]
    result = _measure(cls, tiny_task, params=cls.test_parameters, device="cpu")
    assert result["status"] == "ok", result["reason"]
    assert result["timing"]["warmup_s"] >= 3.0
    epochs = sum(e["seconds"] for e in result["epochs"])
    assert result["timing"]["fit_s"] < 3.0
    assert result["timing"]["fit_s"] >= epochs


def test_the_floor_is_realised_on_the_evaluated_pixels(tiny_task):
    """The noise floor of the result is the perfect model's RMSE on the test pixels: the
    generating function evaluated on them, against a numpy reference from the cube."""
    result = _measure(SleepyCase, tiny_task, params={"epochs": 1})
    metrics = result["metrics"]
    x, y = tiny_task.load_part("test")  # physical units, the reference path
    features = tiny_task.spec.features
    column = {name: x[:, features.index(name)] for name in features}
    angle = np.arctan2(column["sin_doy"], column["cos_doy"])
    expected = lst_oracle(column["air_temperature_2m"], column["lat"], angle)
    realised = float(np.sqrt(np.mean((y - expected) ** 2)))
    assert metrics["noise_floor_source"] == "realised"
    assert metrics["noise_floor_nominal"] == 1.5
    assert metrics["noise_floor_rmse"] == pytest.approx(realised, rel=1e-4)
    assert metrics["noise_floor_rmse"] != pytest.approx(1.5, rel=1e-3)  # not the nominal
    assert metrics["rmse_over_noise_floor"] == pytest.approx(metrics["rmse"] / realised, rel=1e-4)


def test_a_cube_of_unknown_origin_has_no_realised_floor(tiny):
    from cubebench.task import get_task, prepare_task

    foreign = tiny.copy()
    foreign.attrs = {k: v for k, v in tiny.attrs.items() if "generating" not in k}
    task = prepare_task(get_task("lst-from-t2m"), foreign)
    metrics = _measure(SleepyCase, task, params={"epochs": 1})["metrics"]
    assert metrics["noise_floor_source"] == "nominal"
    assert metrics["noise_floor_rmse"] == metrics["noise_floor_nominal"] == 1.5


def _epochs(val_rmse: list[float], std: float, stage: list[float] | None = None):
    return [
        EpochRecord(i, 1.0, (v / std) ** 2, 2.0, 100, {"stage": s} if stage else {})
        for i, (v, s) in enumerate(zip(val_rmse, stage or [0.0] * len(val_rmse)))
    ]


def test_time_to_quality_is_the_first_epoch_within_ten_percent_of_the_floor():
    std, floor = 10.0, 1.5
    target = QUALITY_FACTOR * floor
    reached = time_to_quality(_epochs([3.0, 1.7, target * 0.999, 1.0], std), std, floor)
    assert reached == {"target_rmse": round(target, 6), "seconds": 6.0, "samples": 300, "epoch": 2}
    never = time_to_quality(_epochs([3.0, 2.0], std), std, floor)
    assert never["seconds"] is None and never["epoch"] is None
    assert time_to_quality(_epochs([3.0], std), std, None) is None  # no floor: no target
    # staged (transfer): judged on the last stage, with the time of the stages before it
    staged = time_to_quality(_epochs([1.0, 3.0, 1.6], std, [0.0, 1.0, 1.0]), std, floor)
    assert staged["epoch"] == 2 and staged["seconds"] == 6.0


def test_a_failed_case_has_every_key_with_nulls(tiny_task):
    class Broken(SleepyCase):
        name = "broken"

        def fit(self) -> None:
            raise ValueError("no way")

    result = _measure(Broken, tiny_task)
    assert result["status"] == "failed" and result["reason"] == "ValueError: no way"
    for section in ("timing", "throughput", "loading", "memory"):
        assert set(result[section]) >= set(
            results.new_result(
                run_id="",
                case="",
                library="",
                task="",
                params={},
                seed=0,
                split_seed=0,
                repeat=0,
                threads=1,
                world_size=1,
                device="cpu",
                cube_spec="",
                environment={},
            )[section]
        )
    assert result["throughput"]["train_samples"] is None
    assert result["memory"]["gpu_peak_mb"] is None and result["started_at"]
    assert math.isfinite(result["timing"]["total_s"])
