"""The case files in cases/: each one end to end on the tiny cube with short epochs (finite
predictions of every predictor, losses logged and falling, validation losses present, the
same seed giving the same predictions), and the fairness twins being the same model. Cases of
the patch task (`lst-gapfill`) are evaluated on the pixels they fill, as the runner does."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cubebench.case import Context
from cubebench.loading import open_stream
from cubebench.runner import discover
from cubebench.task import get_task, prepare_task

CASES_DIR = Path(__file__).resolve().parents[1] / "cases"
NAMES = [
    "sklearn-sgd",
    "sklearn-hgb",
    "torch-mlp",
    "keras-mlp",
    "torch-transfer",
    "keras-transfer",
    "torch-cnn",
    "keras-cnn",
    "sklearn-hgb-gapfill",
]
MLPS = {"torch-mlp", "keras-mlp", "torch-transfer", "keras-transfer"}
CNNS = {"torch-cnn", "keras-cnn"}
GAPFILL = CNNS | {"sklearn-hgb-gapfill"}
TRANSFER = {"torch-transfer", "keras-transfer"}
# short runs: a few epochs of small batches on the tiny cube
SHORT = {
    "sklearn-sgd": {"epochs": 2, "batch_size": 2048},
    "sklearn-hgb": {"max_iter": 30},
    "torch-mlp": {"epochs": 3, "batch_size": 1024},
    "keras-mlp": {"epochs": 3, "batch_size": 1024},
    "torch-transfer": {"epochs": 3, "batch_size": 1024, "finetune_epochs": 4},
    "keras-transfer": {"epochs": 3, "batch_size": 1024, "finetune_epochs": 4},
    "torch-cnn": {"epochs": 3, "batch_size": 16},
    "keras-cnn": {"epochs": 3, "batch_size": 16},
    "sklearn-hgb-gapfill": {"max_iter": 30},
}


@pytest.fixture(scope="module")
def cases():
    return {name: cls for name, (_, cls) in discover(CASES_DIR).items()}


@pytest.fixture(scope="module")
def tasks(tiny):
    return {
        name: prepare_task(get_task(name), tiny)
        for name in ("lst-from-t2m", "lst-from-t2m-transfer", "lst-gapfill")
    }


def run_case(cls, task, seed: int = 0, **params):
    """setup / fit as the runner does, then every predictor on the eval part."""
    context = Context(task, {**cls.parameters, **params}, seed=seed, threads=2)
    case = cls(context)
    case.setup()
    case.fit()
    predictions: dict[str, list[np.ndarray]] = {}
    targets = []
    for x, y, *mask in open_stream(task, cls.eval_part, shuffle=False).batches(0):
        keep = mask[0] > 0 if mask else np.ones(y.shape, bool)  # windows: the pixels to fill
        targets.append(y[keep])
        for name, predict in case.predictors().items():
            y_hat = predict(x)
            assert isinstance(y_hat, np.ndarray) and y_hat.size == y.size, name
            predictions.setdefault(name, []).append(y_hat.reshape(y.shape)[keep])
    return (
        case,
        context,
        {k: np.concatenate(v) for k, v in predictions.items()},
        np.concatenate(targets),
    )


def test_the_cases_are_discovered(cases):
    assert set(NAMES) <= set(cases)
    for name in NAMES:
        cls = cases[name]
        assert cls.library in ("scikit-learn", "torch", "keras")
        assert "cpu" in cls.devices
        assert cls.parameters
    for name in TRANSFER:
        assert cases[name].task == "lst-from-t2m-transfer"
        assert cases[name].eval_part == "target_test"
    for name in GAPFILL:
        assert cases[name].task == "lst-gapfill"


def test_the_twins_share_their_parameters(cases):
    assert cases["torch-mlp"].parameters == cases["keras-mlp"].parameters
    assert cases["torch-transfer"].parameters == cases["keras-transfer"].parameters
    assert cases["torch-cnn"].parameters == cases["keras-cnn"].parameters


def test_listing_the_cases_loads_no_framework():
    code = (
        "import sys; from cubebench.runner import discover; "
        f"discover({str(CASES_DIR)!r}); "
        "loaded = {'torch', 'tensorflow', 'keras', 'sklearn'} & set(sys.modules); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("name", NAMES)
def test_case_end_to_end(name, cases, tasks):
    cls = cases[name]
    task = tasks[cls.task]
    case, context, predictions, y = run_case(cls, task, **SHORT[name])
    if name in GAPFILL:
        assert len(y) == task.windows.targets[cls.eval_part]  # every hidden pixel, once
    else:
        assert len(y) == task.samples[cls.eval_part]
    for predictor, y_hat in predictions.items():
        assert np.isfinite(y_hat).all(), predictor
    assert context.epochs, "no epoch logged"
    assert all(e.val_loss is not None and np.isfinite(e.val_loss) for e in context.epochs)
    assert all(e.train_loss is not None and np.isfinite(e.train_loss) for e in context.epochs)
    rmse = {k: float(np.sqrt(np.mean((v - y) ** 2))) for k, v in predictions.items()}

    if name in MLPS | CNNS:
        stage0 = [e for e in context.epochs if not e.extra.get("stage")]
        assert len(stage0) == SHORT[name]["epochs"]
        train = [e.train_loss for e in stage0]
        val = [e.val_loss for e in stage0]
        assert all(b < a for a, b in itertools.pairwise(train)), train
        assert val[-1] < val[0], val
        assert all(e.samples == task.samples["train"] for e in stage0)
    if name.startswith("keras"):
        assert context.stall_estimated and context.stall_seconds >= 0
    elif not name.startswith("sklearn-hgb"):
        assert not context.stall_estimated  # measured by timed_batches
    if name in TRANSFER:
        assert list(predictions) == ["finetuned", "source_only", "scratch"]
        finetune = [e for e in context.epochs if e.extra.get("stage") == 1.0]
        assert (
            finetune and sum(e.extra["epochs"] for e in finetune) == SHORT[name]["finetune_epochs"]
        )
        extra = case.extra_metrics(rmse)
        assert extra["transfer_gain"] == pytest.approx(rmse["scratch"] / rmse["finetuned"])
        n = round(case.parameters["target_fraction"] * task.samples["target_train"])
        assert extra["target_train_samples"] == max(1, n)
    else:
        assert list(predictions) == ["model"]
        assert rmse["model"] < 1.0  # better than predicting the mean (normalised units)

    # the same seed again: the same model
    _, _, again, _ = run_case(cls, task, **SHORT[name])
    for predictor, y_hat in predictions.items():
        if name.startswith("sklearn"):
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


def test_freeze_layers_keeps_the_first_layers():
    from cubebench.models import keras as km
    from cubebench.models import torch as tm

    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = rng.normal(size=256).astype(np.float32)
    budget = {"epochs": 2, "batch_size": 64, "lr": 1e-2}

    tmodel = tm.build_mlp(4, (8, 8), "relu", seed=0)
    before = [lay.weight.detach().clone().numpy() for lay in tm.dense_layers(tmodel)]
    tm.freeze(tmodel, 1)
    tm.fit_arrays(tmodel, x, y, None, **budget)
    after = [lay.weight.detach().numpy() for lay in tm.dense_layers(tmodel)]
    assert np.array_equal(before[0], after[0]) and not np.array_equal(before[2], after[2])

    kmodel = km.build_mlp(4, (8, 8), "relu", seed=0)
    before = [lay.kernel.numpy() for lay in kmodel.layers]
    km.freeze(kmodel, 1)
    km.fit_arrays(kmodel, x, y, None, **budget)
    after = [lay.kernel.numpy() for lay in kmodel.layers]
    assert np.array_equal(before[0], after[0]) and not np.array_equal(before[2], after[2])
    with pytest.raises(ValueError):
        tm.freeze(tmodel, 3)  # the output layer must stay trainable
