"""The U-Net twins of the gap-filling task and its cases: the torch and Keras U-Nets are the
same model (shapes, parameter count, initialisation, the same function for the same weights,
the same training steps), the masked loss is the MSE of the masked pixels, and the
gradient-boosting baseline's neighbourhood features are what they say (its fill near the noise
floor on tiny). tests/test_cases.py runs every case of `lst-gapfill` end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cubebench.case import Context
from cubebench.discovery import discover
from cubebench.loading import open_stream
from cubebench.task import get_task, prepare_task

CASES_DIR = Path(__file__).resolve().parents[1] / "cases"


def unet_parameters(c: int, out: int, widths: tuple[int, ...]) -> int:
    """The U-Net's parameter count, layer by layer (3x3 convolutions with biases)."""

    def conv(i: int, o: int, k: int = 3) -> int:
        return i * o * k * k + o

    total, width = 0, c
    for w in widths:
        total += conv(width, w) + conv(w, w)
        width = w
    total += conv(width, 2 * widths[-1]) + conv(2 * widths[-1], 2 * widths[-1])
    width = 2 * widths[-1]
    for w in reversed(widths):
        total += conv(width + w, w) + conv(w, w)
        width = w
    return total + conv(width, out, 1)


def twins(c: int, out: int, window: tuple[int, int], widths=(16, 32), seed: int = 3):
    """A Keras U-Net and a torch U-Net holding the Keras one's weights (biases made nonzero,
    so that they are compared too)."""
    import torch

    from cubebench.models import keras as km
    from cubebench.models import torch as tm

    kmodel = km.build_unet(c, out, window, widths, seed=seed)
    tmodel = tm.build_unet(c, out, widths=widths, seed=seed)
    rng = np.random.default_rng(seed)
    kconvs, tconvs = km.unet_convolutions(kmodel), tmodel.convolutions()
    assert len(kconvs) == len(tconvs) == 4 * len(widths) + 3
    with torch.no_grad():
        for kconv, tconv in zip(kconvs, tconvs):
            kconv.bias.assign(rng.normal(0, 0.1, kconv.bias.shape).astype(np.float32))
            # Keras: (kh, kw, in, out); torch: (out, in, kh, kw)
            tconv.weight.copy_(torch.from_numpy(kconv.kernel.numpy().transpose(3, 2, 0, 1)))
            tconv.bias.copy_(torch.from_numpy(kconv.bias.numpy()))
    return kmodel, tmodel


def windows(n: int, c: int, t: int, h: int, w: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c, h, w)).astype(np.float32)
    y = rng.normal(size=(n, t, h, w)).astype(np.float32)
    mask = (rng.random((n, t, h, w)) < 0.2).astype(np.float32)
    return x, y, mask


def numpy_masked_mse(pred, y, mask) -> float:
    pred, y, mask = (np.asarray(a, np.float64) for a in (pred, y, mask))
    return float((mask * (pred - y) ** 2).sum() / max(mask.sum(), 1.0))


# --- the model ------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [(16, 16), (20, 20), (13, 7), (1, 1)])
def test_unets_keep_the_window_shape(window):
    from cubebench.models import keras as km
    from cubebench.models import torch as tm

    x, _, _ = windows(3, 6, 2, *window)
    kmodel = km.build_unet(6, 2, window, seed=0)
    tmodel = tm.build_unet(6, 2, seed=0)
    assert km.predict(kmodel, x).shape == (3, 2, *window)
    assert tm.predict(tmodel, x).shape == (3, 2, *window)
    assert tm.predict(tmodel, x[:0]).shape == (0, 2, *window)
    assert km.predict(kmodel, x[:0]).shape == (0, 2, *window)


@pytest.mark.parametrize("widths", [(16, 32), (8,), (4, 8, 16)])
def test_torch_and_keras_unets_have_the_same_parameters(widths):
    from cubebench.models import keras as km
    from cubebench.models import torch as tm

    expected = unet_parameters(6, 1, widths)
    tmodel = tm.build_unet(6, 1, widths=widths, seed=0)
    kmodel = km.build_unet(6, 1, (16, 16), widths, seed=0)
    assert sum(p.numel() for p in tmodel.parameters()) == expected
    assert kmodel.count_params() == expected
    if widths == (16, 32):
        assert expected == 118_705  # the default model of torch-cnn and keras-cnn
    for kconv, tconv in zip(km.unet_convolutions(kmodel), tmodel.convolutions()):
        kernel, weight = kconv.kernel.numpy(), tconv.weight.detach().numpy()
        assert kernel.shape == weight.transpose(2, 3, 1, 0).shape
        kh, kw, fan_in, fan_out = kernel.shape
        limit = np.sqrt(6.0 / (kh * kw * (fan_in + fan_out)))  # Glorot uniform
        for w in (kernel, weight):
            assert limit >= np.abs(w).max() > 0.5 * limit
        assert not kconv.bias.numpy().any() and not tconv.bias.detach().numpy().any()


def test_unet_seed_makes_the_weights():
    from cubebench.models import torch as tm

    a, b, c = (tm.build_unet(6, 1, seed=s).convolutions()[0].weight for s in (1, 1, 2))
    assert np.array_equal(a.detach().numpy(), b.detach().numpy())
    assert not np.array_equal(a.detach().numpy(), c.detach().numpy())


@pytest.mark.parametrize("window", [(16, 16), (20, 20), (13, 7)])
def test_the_same_weights_give_the_same_function(window):
    from cubebench.models import keras as km
    from cubebench.models import torch as tm

    kmodel, tmodel = twins(6, 2, window)
    x, _, _ = windows(5, 6, 2, *window, seed=1)
    np.testing.assert_allclose(tm.predict(tmodel, x), km.predict(kmodel, x), atol=2e-5)


# --- the masked loss ------------------------------------------------------------------------


def test_masked_loss_is_the_mse_of_the_masked_pixels():
    import keras
    import torch

    from cubebench.models import keras as km
    from cubebench.models import torch as tm

    pred, y, mask = windows(4, 2, 2, 5, 5, seed=2)
    pred = pred[:, :2]
    expected = numpy_masked_mse(pred, y, mask)
    got = tm.masked_mse(*(torch.from_numpy(a) for a in (pred, y, mask)))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    packed = np.concatenate([y, mask], axis=1)
    assert float(km.masked_mse(packed, pred)) == pytest.approx(expected, rel=1e-6)
    # as Keras applies it (compiled, wrapped, reduced): still the same number, and the metric
    identity = keras.Sequential([keras.Input(pred.shape[1:]), keras.layers.Identity()])
    km.compile_model(identity, 1e-3, masked=True)
    logs = identity.evaluate(pred, packed, batch_size=len(pred), verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(expected, rel=1e-6)
    assert logs["masked_mse"] == pytest.approx(expected, rel=1e-6)
    # no masked pixel: zero, not NaN
    zero = np.zeros_like(mask)
    assert float(tm.masked_mse(*(torch.from_numpy(a) for a in (pred, y, zero)))) == 0.0
    assert float(km.masked_mse(np.concatenate([y, zero], axis=1), pred)) == 0.0


def test_masked_metric_and_torch_evaluate_weight_every_pixel_the_same():
    """Over several batches the logged loss is the MSE of all masked pixels, not a mean of
    per-batch means (the batches here hold very different numbers of masked pixels)."""
    from cubebench.models import keras as km
    from cubebench.models import torch as tm

    kmodel, tmodel = twins(6, 1, (8, 8), widths=(4,))
    batches = [windows(n, 6, 1, 8, 8, seed=n) for n in (3, 7)]
    batches[0][2][:] = 0.0
    batches[0][2][0, 0, :2, :2] = 1.0  # 4 masked pixels in the first batch
    preds = [km.predict(kmodel, x) for x, _, _ in batches]
    expected = numpy_masked_mse(
        np.concatenate([p.reshape(-1) for p in preds]),
        np.concatenate([y.reshape(-1) for _, y, _ in batches]),
        np.concatenate([m.reshape(-1) for _, _, m in batches]),
    )
    metric = km.MaskedMSE()
    for (_, y, mask), pred in zip(batches, preds):
        metric.update_state(np.concatenate([y, mask], axis=1), pred)
    assert float(metric.result()) == pytest.approx(expected, rel=1e-5)
    assert tm.evaluate(tmodel, batches) == pytest.approx(expected, rel=1e-4)


def test_torch_and_keras_take_the_same_training_steps():
    """The same weights and batches, Adam and the cosine schedule: the same model after."""

    from cubebench.models import keras as km
    from cubebench.models import torch as tm

    kmodel, tmodel = twins(6, 1, (8, 8), widths=(4, 8))
    x, y, mask = windows(64, 6, 1, 8, 8, seed=4)
    initial = tm.predict(tmodel, windows(64, 6, 1, 8, 8, seed=5)[0])
    steps, batch, lr = 6, 16, 2e-3
    km.compile_model(kmodel, lr, steps, 0.0, masked=True)
    kmodel.fit(
        x, np.concatenate([y, mask], axis=1), batch_size=batch, epochs=2, shuffle=False, verbose=0
    )
    trainer = tm.Trainer(tmodel, "cpu", lr, steps, 0.0)  # the step every torch case takes
    tmodel.train()
    for _ in range(2):
        for i in range(0, len(x), batch):
            trainer.step(tuple(a[i : i + batch] for a in (x, y, mask)))
    probe = windows(64, 6, 1, 8, 8, seed=5)[0]
    after = tm.predict(tmodel, probe)
    assert np.abs(after - initial).max() > 0.1  # the steps moved the model ...
    # ... and both frameworks to the same place: Adam's first steps are ~lr whatever the
    # gradient's size, so float noise in near-zero gradients leaves ~1e-3 differences
    np.testing.assert_allclose(after, km.predict(kmodel, probe), atol=2e-3)


# --- the gradient-boosting baseline ---------------------------------------------------------
# (every case of the task also runs end to end in tests/test_cases.py)


@pytest.fixture(scope="module")
def gapfill(tiny):
    return prepare_task(get_task("lst-gapfill"), tiny)


@pytest.fixture(scope="module")
def hgb(gapfill):
    cls = discover(CASES_DIR)["sklearn-hgb-gapfill"][1]
    context = Context(gapfill, {**cls.parameters, "max_iter": 30}, seed=0, threads=2)
    case = cls(context)
    case.setup()
    return case, context


def test_hgb_features_are_the_neighbourhood_means(hgb):
    """The vectorised box features against a loop over pixels and their squares."""
    case, _ = hgb
    rng = np.random.default_rng(0)
    b, h, w = 3, 7, 6
    c = len(case.inputs) + 2 + len(case.coords)
    x = rng.normal(size=(b, c, h, w)).astype(np.float32)
    visible = rng.random((b, h, w)) < 0.3
    visible[0] = False  # a window without any visible pixel
    x[:, case.visible] = visible
    x[:, case.visible_lst] *= visible
    where = rng.random((b, 1, h, w)) < 0.5
    got = case.features(x, where)
    assert got.shape[0] == where.sum() and got.dtype == np.float32
    j, r = case.inputs[0], case.ratios[0]
    for row, (i, _, y0, x0) in zip(got, np.argwhere(where)):
        expected = [x[i, k, y0, x0] for k in (*case.inputs, *case.coords)]
        for k in case.sizes:
            ys = slice(max(0, y0 - k // 2), y0 + k // 2 + 1)
            xs = slice(max(0, x0 - k // 2), x0 + k // 2 + 1)
            seen = x[i, case.visible, ys, xs] > 0.5
            lst, inp = x[i, case.visible_lst, ys, xs][seen], x[i, j, ys, xs][seen]
            mean = lst.mean() if seen.any() else np.nan
            offset = (lst - r * inp).mean() if seen.any() else np.nan
            expected += [seen.mean(), mean, offset, r * x[i, j, y0, x0] + offset]
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-5)


def test_hgb_fills_near_the_noise_floor(hgb, gapfill):
    case, context = hgb
    case.fit()
    assert context.train_samples == gapfill.samples["train"]  # windows, as for the U-Nets
    assert all(e.extra["pixels"] == gapfill.windows.targets["train"] for e in context.epochs)
    se, n = 0.0, 0
    for x, y, mask in open_stream(gapfill, "test", batch_size=32, shuffle=False).batches(0):
        y_hat = case.predict(x)
        assert y_hat.shape == y.shape and np.isfinite(y_hat).all()
        visible = x[:, case.visible : case.visible + 1] > 0.5  # t = 1
        np.testing.assert_array_equal(y_hat[visible], x[:, case.visible_lst][visible[:, 0]])
        keep = mask > 0
        se += float(((((y_hat - y)[keep]) * gapfill.target_std) ** 2).sum())
        n += int(keep.sum())
    assert n == gapfill.windows.targets["test"]
    assert np.sqrt(se / n) < 1.3 * gapfill.noise_floor  # 1.65 K on tiny, floor 1.5 K
