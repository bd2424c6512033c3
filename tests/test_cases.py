"""The case files in cases/, every one of them (parametrized over `discover()`, so a new case
is tested without editing this file): end to end on the tiny cube with its own
`test_parameters`, through the suite's one measurement path (`cubebench.measure.run_case`):
finite predictions of every predictor, losses logged and falling, validation losses present,
the same seed giving the same predictions, timings booked as the result schema defines them;
and the fairness twins being the same model. Cases of the patch task (`lst-gapfill`) are
evaluated on the pixels they fill, as the runner does."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cubebench import results
from cubebench.discovery import discover
from cubebench.loading import open_stream
from cubebench.measure import run_case as measure_case
from cubebench.task import get_task, prepare_task

CASES_DIR = Path(__file__).resolve().parents[1] / "cases"
CASES = discover(CASES_DIR)
NAMES = list(CASES)
LIBRARIES = {"scikit-learn", "torch", "keras"}


class _Tasks(dict):
    """Prepared tasks by name, each prepared when a test first asks for it (the fast tier
    runs no window case and never prepares the window task)."""

    def __init__(self, cube):
        super().__init__()
        self.cube = cube

    def __missing__(self, name: str):
        self[name] = prepare_task(get_task(name), self.cube)
        return self[name]


@pytest.fixture(scope="module")
def tasks(tiny):
    return _Tasks(tiny)


def run_case(cls, task, seed: int = 0, **params):
    """The case through the suite's measurement path, then every predictor on the eval part
    (the batches' mask on windows: the pixels to fill)."""
    measured = measure_case(
        cls,
        task.cube,
        run_id="test",
        params={**cls.test_parameters, **params},
        device="cpu",
        seed=seed,
        threads=2,
        environment=results.environment_manifest(2, seed),
        task=task,
    )
    assert measured.result["status"] == "ok", measured.result["reason"]
    results.validate(measured.result)
    case = measured.case
    predictions: dict[str, list[np.ndarray]] = {}
    targets = []
    for x, y, *mask in open_stream(task, cls.eval_part, shuffle=False).batches(0):
        keep = mask[0] > 0 if mask else np.ones(y.shape, bool)
        targets.append(y[keep])
        for name, predict in case.predictors().items():
            y_hat = predict(x)
            assert isinstance(y_hat, np.ndarray) and y_hat.size == y.size, name
            predictions.setdefault(name, []).append(y_hat.reshape(y.shape)[keep])
    return (
        measured,
        {k: np.concatenate(v) for k, v in predictions.items()},
        np.concatenate(targets),
    )


@pytest.mark.parametrize("name", NAMES)
def test_the_case_declares_what_the_suite_needs(name):
    cls = CASES[name][1]
    assert cls.library in LIBRARIES | {"xgboost", "lightgbm"}
    assert "cpu" in cls.devices
    assert cls.parameters and cls.test_parameters
    assert set(cls.test_parameters) <= set(cls.parameters), "test overrides of unknown keys"
    get_task(cls.task)  # a task the suite knows
    if cls.task == "lst-from-t2m-transfer":
        assert cls.eval_part == "target_test"


def test_the_twins_share_their_parameters():
    for kind in ("mlp", "transfer", "cnn"):
        torch_case, keras_case = CASES[f"torch-{kind}"][1], CASES[f"keras-{kind}"][1]
        assert torch_case.parameters == keras_case.parameters
        assert torch_case.test_parameters == keras_case.test_parameters


def test_listing_the_cases_loads_no_framework():
    code = (
        "import sys; from cubebench.discovery import discover; "
        f"discover({str(CASES_DIR)!r}); "
        "loaded = {'torch', 'tensorflow', 'keras', 'sklearn'} & set(sys.modules); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# the window cases (U-Nets, neighbourhood trees) train on patches: tens of seconds each, so
# they run in the full tier; the pixel cases keep every framework's loop in the fast tier
END_TO_END = [
    # the transfer twins share one loop: torch's runs in the fast tier, keras' in the full
    pytest.param(name, marks=pytest.mark.slow)
    if get_task(cls.task).patch or name == "keras-transfer"
    else name
    for name, (_, cls) in CASES.items()
]


@pytest.mark.parametrize("name", END_TO_END)
def test_case_end_to_end(name, tasks):
    cls = CASES[name][1]
    task = tasks[cls.task]
    measured, predictions, y = run_case(cls, task)
    result, context = measured.result, measured.context
    windows = task.spec.patch is not None
    if windows:
        assert len(y) == task.windows.targets[cls.eval_part]  # every hidden pixel, once
    else:
        assert len(y) == task.samples[cls.eval_part]
    assert result["metrics"]["n"] == len(y)
    for predictor, y_hat in predictions.items():
        assert np.isfinite(y_hat).all(), predictor
    assert context.epochs, "no epoch logged"
    assert all(e.val_loss is not None and np.isfinite(e.val_loss) for e in context.epochs)
    assert all(e.train_loss is not None and np.isfinite(e.train_loss) for e in context.epochs)
    rmse = {k: float(np.sqrt(np.mean((v - y) ** 2))) for k, v in predictions.items()}

    # the timings as the result defines them: the phases are apart and add up to the fit
    timing = result["timing"]
    assert timing["warmup_s"] > 0 and timing["fit_s"] > 0 and timing["probe_s"] >= 0
    logged = sum(e.seconds for e in context.epochs)
    assert logged <= timing["fit_s"] * 1.001 + 1e-3  # epochs are inside the fit, not beyond
    loading = result["loading"]
    if context.train_streams:  # a streaming loop: the stall has its interval, not clamped
        assert loading["stall_method"] == "resident-steps"
        assert loading["stall_ci95"] is not None and loading["stall_ci95"] >= 0
        assert loading["steps"] == context.loop.steps > 0
        assert (loading["wait_fraction"] is None) == (cls.library == "keras")
    else:
        assert loading["stall_fraction"] is None and loading["stall_method"] is None

    stage0 = [e for e in context.epochs if not e.extra.get("stage")]
    if "epochs" in cls.parameters and cls.library != "scikit-learn":
        epochs = {**cls.parameters, **cls.test_parameters}["epochs"]
        assert len(stage0) == epochs
        train = [e.train_loss for e in stage0]
        val = [e.val_loss for e in stage0]
        assert all(b < a for a, b in itertools.pairwise(train)), train
        assert val[-1] < val[0], val
        assert all(e.samples == task.samples["train"] for e in stage0)
    if cls.eval_part == "target_test":  # transfer: its baselines, and the gain they give
        assert list(predictions) == ["finetuned", "source_only", "scratch"]
        params = {**cls.parameters, **cls.test_parameters}
        finetune = [e for e in context.epochs if e.extra.get("stage") == 1.0]
        assert finetune and sum(e.extra["epochs"] for e in finetune) == params["finetune_epochs"]
        extra = measured.case.extra_metrics(rmse)
        assert extra["transfer_gain"] == pytest.approx(rmse["scratch"] / rmse["finetuned"])
        n = round(params["target_fraction"] * task.samples["target_train"])
        assert extra["target_train_samples"] == max(1, n)
    else:
        assert list(predictions) == ["model"]
        assert rmse["model"] < 1.0  # better than predicting the mean (normalised units)

    # the same seed again: the same model
    _, again, _ = run_case(cls, task)
    for predictor, y_hat in predictions.items():
        if cls.library == "scikit-learn":
            np.testing.assert_array_equal(again[predictor], y_hat)
        else:
            scale = float(np.abs(y_hat).max())
            np.testing.assert_allclose(again[predictor], y_hat, rtol=1e-3, atol=1e-3 * scale)


# --- the fairness twins: the same model in torch and keras ---------------------------------


def test_torch_and_keras_build_the_same_mlp():
    import torch

    from cubebench.models import keras as km
    from cubebench.models import torch as tm

    hidden = (16, 8)
    tmodel = tm.build_mlp(4, hidden, "relu", seed=3)
    kmodel = km.build_mlp(4, hidden, "relu", seed=3)
    tlayers = tm.dense_layers(tmodel)
    assert [(lay.in_features, lay.out_features) for lay in tlayers] == [(4, 16), (16, 8), (8, 1)]
    assert [tuple(lay.kernel.shape) for lay in kmodel.layers] == [(4, 16), (16, 8), (8, 1)]
    for tlayer, klayer in zip(tlayers, kmodel.layers):
        limit = np.sqrt(6.0 / (tlayer.in_features + tlayer.out_features))  # Glorot uniform
        for w in (tlayer.weight.detach().numpy(), klayer.kernel.numpy()):
            assert np.abs(w).max() <= limit and np.abs(w).max() > 0.5 * limit
        assert not tlayer.bias.detach().numpy().any() and not klayer.bias.numpy().any()
        # the same weights give the same function
        with torch.no_grad():
            tlayer.weight.copy_(torch.from_numpy(klayer.kernel.numpy().T))
    x = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)
    np.testing.assert_allclose(tm.predict(tmodel, x), km.predict(kmodel, x), rtol=1e-5, atol=1e-5)


def test_torch_and_keras_share_the_learning_rate_schedule():
    import keras

    from cubebench.models import torch as tm

    schedule = keras.optimizers.schedules.CosineDecay(3e-3, 100, alpha=0.1)
    for step in (0, 1, 37, 99, 100, 150):
        expected = float(schedule(step))
        assert 3e-3 * tm.cosine_factor(step, 100, 0.1) == pytest.approx(expected, rel=1e-5)


def test_freeze_layers_keeps_the_first_layers(tasks):
    from cubebench.case import Context
    from cubebench.models import keras as km
    from cubebench.models import torch as tm

    context = Context(tasks["lst-from-t2m"], {})

    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = rng.normal(size=256).astype(np.float32)
    budget = {"epochs": 2, "batch_size": 64, "lr": 1e-2}

    tmodel = tm.build_mlp(4, (8, 8), "relu", seed=0)
    before = [lay.weight.detach().clone().numpy() for lay in tm.dense_layers(tmodel)]
    tm.freeze(tmodel, 1)
    tm.fit_arrays(tmodel, context, x, y, None, **budget)
    after = [lay.weight.detach().numpy() for lay in tm.dense_layers(tmodel)]
    assert np.array_equal(before[0], after[0]) and not np.array_equal(before[2], after[2])

    kmodel = km.build_mlp(4, (8, 8), "relu", seed=0)
    before = [lay.kernel.numpy() for lay in kmodel.layers]
    km.freeze(kmodel, 1)
    km.fit_arrays(kmodel, context, x, y, None, **budget)
    after = [lay.kernel.numpy() for lay in kmodel.layers]
    assert np.array_equal(before[0], after[0]) and not np.array_equal(before[2], after[2])
    with pytest.raises(ValueError):
        tm.freeze(tmodel, 3)  # the output layer must stay trainable
