"""The Keras half of the fairness twins: the MLP and the U-Net, their optimiser and their
training helpers.

The same models as `cubebench.models.torch`: the same layers and widths, activation,
Glorot-uniform weights and zero biases, Adam with the same learning rate, epsilon and cosine
schedule, the same batch size, epochs and loss (MSE; on windows, the MSE over the pixels to
fill, with the target and its mask packed into Keras' single `y`).

The U-Net takes and returns channels-first arrays like torch's (`[B, C, h, w]` in,
`[B, t, h, w]` out) and permutes inside: TensorFlow's CPU convolutions are channels-last only.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from cubebench.case import Context
from cubebench.loading import PatchStream, Stream, open_stream
from cubebench.loading.tf import dataset
from cubebench.models import EpochLoss

ACTIVATIONS = ("relu", "silu", "tanh", "gelu")
EPSILON = 1e-7  # Adam's epsilon, the same in both frameworks
EVAL_BATCH = 65536  # pixels per forward pass in prediction
TIMED_STEPS = 30  # train steps timed on a cached batch for the stall estimate


def seed_and_threads(seed: int, threads: int) -> None:
    """Seed Python, NumPy and TensorFlow and use `threads` CPU threads.

    TensorFlow fixes its thread pools when its runtime starts: later calls (a second case in
    the same process) keep the first setting.
    """
    keras.utils.set_random_seed(int(seed))
    threads = max(1, int(threads))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # the runtime is already initialised
        pass


def device_scope(device: str):
    """A `tf.device` scope for "cpu" or "cuda" (TensorFlow calls the GPU "GPU")."""
    return tf.device("/GPU:0" if device.startswith("cuda") else "/CPU:0")


def build_mlp(
    n_features: int,
    hidden: Sequence[int] = (64, 64),
    activation: str = "relu",
    seed: int | None = None,
) -> keras.Sequential:
    """Dense layers of widths `hidden` and a linear output; Glorot-uniform weights, zero bias."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    layers: list = [keras.Input((n_features,))]
    for i, units in enumerate([*hidden, 1]):
        layers.append(
            keras.layers.Dense(
                int(units),
                activation=activation if i < len(hidden) else None,
                kernel_initializer=keras.initializers.GlorotUniform(
                    None if seed is None else int(seed) + i
                ),
                bias_initializer="zeros",
            )
        )
    return keras.Sequential(layers)


def build_unet(
    in_channels: int,
    out_channels: int,
    window: tuple[int, int],
    widths: Sequence[int] = (16, 32),
    seed: int | None = None,
) -> keras.Model:
    """The U-Net of `cubebench.models.torch.UNet` for windows of `window` (h, w):
    `[B, in_channels, h, w]` in, `[B, out_channels, h, w]` out; Glorot-uniform weights (the
    i-th convolution seeded `seed + i`) and zero biases: the distribution of the torch twin's
    weights, not the same draws (the two frameworks' generators differ). Sizes that are not a
    multiple of `2 ** len(widths)` are zero-padded at the bottom and right and cropped back,
    as in torch.
    """
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must be positive, got {widths!r}")
    h, w = (int(n) for n in window)
    factor = 2 ** len(widths)
    pad = ((0, (-h) % factor), (0, (-w) % factor))
    layers = keras.layers
    count = itertools.count()

    def conv(z, width: int, size: int = 3, activation: str | None = "relu"):
        i = next(count)
        return layers.Conv2D(
            width,
            size,
            padding="same",
            activation=activation,
            data_format="channels_last",
            kernel_initializer=keras.initializers.GlorotUniform(
                None if seed is None else int(seed) + i
            ),
            bias_initializer="zeros",
            name=f"conv{i}",
        )(z)

    inputs = keras.Input((int(in_channels), h, w))
    z = layers.Permute((2, 3, 1))(inputs)  # channels last, inside the model
    if pad[0][1] or pad[1][1]:
        z = layers.ZeroPadding2D(pad, data_format="channels_last")(z)
    skips = []
    for width in widths:
        z = conv(conv(z, width), width)
        skips.append(z)
        z = layers.MaxPooling2D(2, data_format="channels_last")(z)
    z = conv(conv(z, 2 * widths[-1]), 2 * widths[-1])
    for width, skip in zip(reversed(widths), reversed(skips)):
        z = layers.UpSampling2D(2, data_format="channels_last", interpolation="nearest")(z)
        z = layers.Concatenate(axis=-1)([z, skip])
        z = conv(conv(z, width), width)
    z = conv(z, int(out_channels), 1, None)
    if pad[0][1] or pad[1][1]:
        z = layers.Cropping2D(pad, data_format="channels_last")(z)
    outputs = layers.Permute((3, 1, 2))(z)  # back to [B, out_channels, h, w]
    return keras.Model(inputs, outputs, name="unet")


def unet_convolutions(model: keras.Model) -> list:
    """The U-Net's convolutions in the order of `cubebench.models.torch.UNet.convolutions`
    (their creation order: down, bottleneck, up, head)."""
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    return sorted(convs, key=lambda layer: int(layer.name.removeprefix("conv")))


def masked_mse(packed, pred):
    """The MSE over the masked pixels: `packed` is `[B, 2t, h, w]` (the target's t planes,
    then its mask's, as `cubebench.loading.tf.dataset` packs them), `pred` `[B, t, h, w]`;
    sum(mask (pred - y)^2) / max(sum(mask), 1), as in torch."""
    ops = keras.ops
    t = ops.shape(pred)[1]
    y, mask = packed[:, :t], packed[:, t:]
    return ops.sum(mask * ops.square(pred - y)) / ops.maximum(ops.sum(mask), 1.0)


class MaskedMSE(keras.metrics.Metric):
    """The MSE over all the masked pixels seen (an epoch's, a validation pass's): Keras'
    loss tracker averages per-batch losses weighted by batch size, torch's loops (and the
    runner's metrics) weight every pixel the same; this is the number both twins log."""

    def __init__(self, name: str = "masked_mse", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable((), initializer="zeros", name="total")
        self.pixels = self.add_variable((), initializer="zeros", name="pixels")

    def update_state(self, y_true, y_pred, sample_weight=None):
        ops = keras.ops
        t = ops.shape(y_pred)[1]
        y, mask = y_true[:, :t], y_true[:, t:]
        self.total.assign_add(ops.sum(mask * ops.square(y_pred - y)))
        self.pixels.assign_add(ops.sum(mask))

    def result(self):
        return self.total / keras.ops.maximum(self.pixels, 1.0)

    def reset_state(self):
        self.total.assign(0.0)
        self.pixels.assign(0.0)


def copy_model(model: keras.Model) -> keras.Model:
    """An independent copy with the same weights (not compiled)."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def freeze(model: keras.Model, n_layers: int) -> None:
    """Freeze the first `n_layers` dense layers; unfreeze the rest. Compile afterwards."""
    if not 0 <= n_layers < len(model.layers):
        raise ValueError(f"freeze_layers must be 0..{len(model.layers) - 1}, got {n_layers}")
    for i, layer in enumerate(model.layers):
        layer.trainable = i >= n_layers


def compile_model(
    model: keras.Model,
    lr: float,
    decay_steps: int = 0,
    alpha: float = 0.0,
    *,
    masked: bool = False,
) -> keras.Model:
    """Adam with a per-step cosine decay to `alpha * lr` over `decay_steps` (0: constant), MSE;
    `masked`: the masked MSE of windows, with `MaskedMSE` as the logged loss."""
    rate = (
        keras.optimizers.schedules.CosineDecay(lr, decay_steps, alpha=alpha)
        if decay_steps > 0
        else lr
    )
    optimizer = keras.optimizers.Adam(rate, epsilon=EPSILON)
    if masked:
        model.compile(optimizer=optimizer, loss=masked_mse, metrics=[MaskedMSE()])
    else:
        model.compile(optimizer=optimizer, loss="mse")
    return model


def steps_per_epoch(samples: int, batch_size: int) -> int:
    return max(1, -(-int(samples) // int(batch_size)))


def batches(stream: Stream) -> tf.data.Dataset:
    """`cubebench.loading.tf.dataset(stream)` with its number of batches declared, so that
    Keras knows the epoch's length (without it, Keras warns at the end of the first epoch
    that the input ran out of data)."""
    n = steps_per_epoch(stream.task.samples[stream.part], stream.batch_size)
    if stream.drop_last:
        n = stream.task.samples[stream.part] // stream.batch_size
    return dataset(stream).apply(tf.data.experimental.assert_cardinality(n))


class EpochLog(keras.callbacks.Callback):
    """Logs every epoch to the context (or only keeps its losses, with `context=None`).

    Times each epoch's training (validation excluded) and the first training step (which
    traces the graph), for the stall estimate.
    """

    def __init__(
        self,
        context: Context | None,
        samples: int,
        epochs: int,
        first_epoch: int = 0,
        of: int | None = None,
    ):
        super().__init__()
        self.context = context
        self.samples = samples
        self.epochs = epochs
        self.first_epoch = first_epoch
        self.of = of or first_epoch + epochs
        self.history: list[EpochLoss] = []
        self.train_seconds = 0.0
        self.first_step_seconds: float | None = None
        self._started = 0.0
        self._trained: float | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self._trained = None
        self._started = time.perf_counter()

    def on_train_batch_begin(self, batch, logs=None):
        # the second step begins: the first (and the graph's tracing) is over. A batch-*end*
        # hook would make Keras convert the logs to Python after every step (a sync).
        if batch == 1 and self.first_step_seconds is None:
            self.first_step_seconds = time.perf_counter() - self._started

    def on_test_begin(self, logs=None):  # validation starts: the epoch's training is over
        if self._trained is None:
            self._trained = time.perf_counter() - self._started

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seconds = self._trained
        if seconds is None:
            seconds = time.perf_counter() - self._started
        self.train_seconds += seconds
        loss, val_loss = logs.get("loss"), logs.get("val_loss")
        if "masked_mse" in logs:  # windows: the MSE of every masked pixel, as torch logs it
            loss, val_loss = logs["masked_mse"], logs.get("val_masked_mse")
        self.history.append(
            EpochLoss(
                float(loss),
                None if val_loss is None else float(val_loss),
                seconds,
                self.samples,
            )
        )
        if self.context is not None:
            self.context.log_epoch(
                self.first_epoch + epoch,
                loss,
                val_loss,
                seconds=seconds,
                samples=self.samples,
                of=self.of,
                lr=float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            )


def time_train_steps(
    model: keras.Model, x: np.ndarray, y: np.ndarray, steps: int = TIMED_STEPS
) -> float:
    """Seconds of one training step on a cached batch (compute only, no input pipeline).

    The model's weights and optimiser state (its step count included) are restored after.
    """
    weights = [v.numpy() for v in model.variables]
    state = [v.numpy() for v in model.optimizer.variables]
    data = tf.data.Dataset.from_tensors((x, y)).repeat().take(steps + 2).cache()
    iterator = iter(data)
    model.make_train_function()
    train = model.train_function
    for _ in range(2):  # warm-up: a batch of a fixed shape may trace once more
        logs = train(iterator)
    float(logs["loss"])
    start = time.perf_counter()
    for _ in range(steps):
        logs = train(iterator)
    float(logs["loss"])  # wait for the last step
    seconds = (time.perf_counter() - start) / steps
    for v, value in zip(model.variables, weights):
        v.assign(value)
    for v, value in zip(model.optimizer.variables, state):
        v.assign(value)
    return seconds


def fit_stream(
    model: keras.Model,
    context: Context,
    train: Stream,
    val: Stream | None,
    *,
    epochs: int,
    lr: float,
    alpha: float = 0.0,
    of: int | None = None,
) -> EpochLog:
    """`model.fit` over the stream's tf.data pipeline for `epochs` epochs (Adam, cosine decay
    over all of them), logging every epoch; then estimates the data stall.

    Keras runs the input pipeline inside its graph, so the wait for batches cannot be timed.
    The estimate: training time of all epochs (validation excluded) - the first step (which
    traces the graph) - the other steps x the time of one step on a cached batch; it also
    counts Keras' per-step overhead outside the step and the CPU the input pipeline takes
    from the model on a shared CPU. Sets `context.stall_seconds` and `stall_estimated`.

    Windows (a `PatchStream`) train on the masked MSE; samples are windows.
    """
    windows = isinstance(train, PatchStream)
    steps = steps_per_epoch(context.task.samples[train.part], train.batch_size)
    compile_model(model, lr, epochs * steps, alpha, masked=windows)
    log = EpochLog(context, context.task.samples[train.part], epochs, of=of)
    model.fit(
        batches(train),
        epochs=epochs,
        validation_data=None if val is None else batches(val),
        shuffle=False,
        verbose=0,
        callbacks=[log],
    )
    # one batch of the part, from a stream outside the counted training streams
    probe = open_stream(
        context.task,
        train.part,
        batch_size=train.batch_size,
        shuffle=False,
        threads=context.threads,
    )
    first_batches = probe.batches(0)
    x, y, *mask = next(first_batches)
    first_batches.close()
    if mask:  # Keras' y of windows: the target and its mask, packed as the dataset packs them
        y = np.concatenate([y, mask[0]], axis=1)
    step = time_train_steps(model, x, y)
    total = epochs * steps
    if log.first_step_seconds is None:  # one step per epoch: no tracing measured
        compute = total * step
    else:
        compute = log.first_step_seconds + (total - 1) * step
    context.stall_seconds += max(0.0, log.train_seconds - compute)
    context.stall_estimated = True
    return log


def fit_arrays(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    val: tuple[np.ndarray, np.ndarray] | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    alpha: float = 0.0,
) -> list[EpochLoss]:
    """Compile and train on in-memory arrays (a small labelled set: fine-tuning), shuffled
    every epoch; Adam with a cosine decay over all the steps. Returns every epoch's losses."""
    compile_model(model, lr, epochs * steps_per_epoch(len(y), batch_size), alpha)
    log = EpochLog(None, len(y), epochs)
    model.fit(
        np.ascontiguousarray(x, np.float32),
        np.ascontiguousarray(y, np.float32),
        batch_size=batch_size,
        epochs=epochs,
        validation_data=val,
        validation_batch_size=EVAL_BATCH,
        shuffle=True,
        verbose=0,
        callbacks=[log],
    )
    return log.history


_predict_functions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _predict_function(model: keras.Model):
    """The model's forward pass as one `tf.function` for any batch size: `predict_on_batch`
    traces again for every new batch shape (the last, partial batch) and every model."""
    function = _predict_functions.get(model)
    if function is None:
        shape = tuple(model.inputs[0].shape[1:])  # (n_features,) or (C, h, w)
        function = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec((None, *shape), tf.float32)],
        )
        _predict_functions[model] = function
    return function


def warm_up_predict(model: keras.Model) -> None:
    """Trace `predict`'s forward pass now (at the end of the fit), not in the first call."""
    predict(model, np.zeros((1, *model.inputs[0].shape[1:]), np.float32))


def predict(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Normalised predictions, float32, in batches of `EVAL_BATCH` pixels: 1-D for pixels
    `x[B, F]`, `[B, t, h, w]` for windows `x[B, C, h, w]`."""
    x = np.ascontiguousarray(x, np.float32)
    function = _predict_function(model)
    if x.ndim != 2:
        step = max(1, EVAL_BATCH // int(np.prod(x.shape[2:])))
        out = np.empty((len(x), *model.outputs[0].shape[1:]), np.float32)
        for start in range(0, len(x), step):
            part = x[start : start + step]
            out[start : start + len(part)] = function(part).numpy()
        return out
    out = np.empty(len(x), np.float32)
    for start in range(0, len(x), EVAL_BATCH):
        part = x[start : start + EVAL_BATCH]
        out[start : start + len(part)] = function(part).numpy().reshape(-1)
    return out
