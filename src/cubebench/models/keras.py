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

import contextlib
import itertools
import time
import weakref
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from cubebench.case import Context
from cubebench.loading import PatchStream, Stream
from cubebench.loading.tf import dataset
from cubebench.models import EpochLoss

ACTIVATIONS = ("relu", "silu", "tanh", "gelu")
EPSILON = 1e-7  # Adam's epsilon, the same in both frameworks
EVAL_BATCH = 65536  # pixels per forward pass in prediction
# why a Keras result has no host-to-device copy time (`result["gpu"]["h2d_note"]`)
COPY_NOTE = (
    "not measurable: tf.data hands host tensors to Keras, whose train function copies them "
    "to the GPU inside the step (cubebench.loading.tf); the copy is part of the step's time"
)


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


def on_device(device: str):
    """A `tf.device` scope for "cpu" or "cuda" (TensorFlow calls the GPU "GPU"): models are
    built and run inside it."""
    return tf.device("/GPU:0" if device.startswith("cuda") else "/CPU:0")


def to_device(model: keras.Model, device: str) -> keras.Model:
    """Keras places a model where it was built (`on_device`)."""
    return model


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
    optimizer.build(model.trainable_variables)  # its state exists before any step (`preserved`)
    return model


def steps_per_epoch(samples: int, batch_size: int) -> int:
    return max(1, -(-int(samples) // int(batch_size)))


def batches(stream: Stream) -> tf.data.Dataset:
    """`cubebench.loading.tf.dataset(stream)` with its number of batches declared, so that
    Keras knows the epoch's length (without it, Keras warns at the end of the first epoch
    that the input ran out of data)."""
    return dataset(stream).apply(tf.data.experimental.assert_cardinality(stream.steps_per_epoch()))


def _packed(batch: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A stream batch as Keras' (x, y): windows carry the target and its mask in one y, as
    `cubebench.loading.tf.dataset` packs them."""
    x, y, *mask = batch
    return x, (np.concatenate([y, mask[0]], axis=1) if mask else y)


def resident_dataset(resident: list[tuple[np.ndarray, ...]]) -> tf.data.Dataset:
    """The resident batches, cycled for ever, with the element spec of the training datasets
    (batch dimension unknown): Keras' traced train and test functions serve both."""
    packed = [_packed(b) for b in resident]
    size = max(len(b[0]) for b in packed)
    x = np.concatenate([b[0] for b in packed])
    y = np.concatenate([b[1] for b in packed])
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(size).cache().repeat()


def array_dataset(
    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int | None = None
) -> tf.data.Dataset:
    """In-memory arrays as batches, reshuffled every pass when a `seed` is given."""
    data = tf.data.Dataset.from_tensor_slices(
        (np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.float32))
    )
    if seed is not None:
        data = data.shuffle(len(y), seed=int(seed), reshuffle_each_iteration=True)
    return data.batch(batch_size)


@contextlib.contextmanager
def preserved(model: keras.Model):
    """Whatever steps run inside leave the weights, the optimiser's state (its step count
    included) and the metrics (the epoch's running loss) as they were."""
    variables = [*model.variables, *model.optimizer.variables, *model.metrics_variables]
    values = [v.numpy() for v in variables]
    try:
        yield
    finally:
        for v, value in zip(variables, values):
            v.assign(value)


def warm_up(model: keras.Model, resident: tf.data.Dataset, validates: bool) -> None:
    """Trace (and run once) the train function, the test function when the fit validates, and
    the forward pass `predict` uses, on resident batches of the training datasets' element
    spec, then put the model back: the fit's first step is then an ordinary step, and the
    tracing is booked as warm-up, for Keras as for torch."""
    with preserved(model):
        model.make_train_function()
        logs = model.train_function(iter(resident.take(1)))
        if validates:
            model.make_test_function()
            logs = model.test_function(iter(resident.take(1)))
        float(logs["loss"])
    warm_up_predict(model)


class EpochLog(keras.callbacks.Callback):
    """Logs every epoch to the context (or only keeps its losses, with `context=None`) and
    times each epoch's training pass (validation excluded) for the loop clock."""

    def __init__(
        self,
        context: Context | None,
        samples: int,
        steps: int,
        epochs: int,
        first_epoch: int = 0,
        of: int | None = None,
    ):
        super().__init__()
        self.context = context
        self.samples = samples
        self.steps = steps
        self.epochs = epochs
        self.first_epoch = first_epoch
        self.of = of or first_epoch + epochs
        self.history: list[EpochLoss] = []
        self._started = 0.0
        self._probed = 0.0
        self._trained: float | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self._trained = None
        self._probed = 0.0
        self._started = time.perf_counter()

    def on_train_batch_begin(self, batch, logs=None):
        # a probe burst may run before the step (`Context.probing`); a batch-*end* hook would
        # make Keras convert the logs to Python after every step (a sync)
        if self.context is not None:
            self._probed += self.context.before_step()

    def on_test_begin(self, logs=None):  # validation starts: the epoch's training is over
        if self._trained is None:
            self._trained = time.perf_counter() - self._started - self._probed

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seconds = self._trained
        if seconds is None:
            seconds = time.perf_counter() - self._started - self._probed
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
            self.context.loop.record(seconds, self.steps)
            self.context.log_epoch(
                self.first_epoch + epoch,
                loss,
                val_loss,
                seconds=seconds,
                samples=self.samples,
                of=self.of,
                lr=float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
                steps=float(self.steps),
            )


def fit_stream(
    model: keras.Model,
    context: Context,
    train: Stream,
    val: Stream | None,
    *,
    epochs: int,
    lr: float,
    alpha: float = 0.0,
    first_epoch: int = 0,
    of: int | None = None,
) -> EpochLog:
    """`model.fit` over the stream's tf.data pipeline for `epochs` epochs (Adam, cosine decay
    over all of them), logging every epoch.

    As for torch: compile and tracing happen first, on resident batches, booked as warm-up;
    the fit is the epochs; bursts of the same train function on the resident batches run
    between training steps (model put back), the compute probe of the stall. Keras runs the
    input pipeline inside its graph, so the wait for a batch cannot be timed: the stall is
    the loop time minus the probe's compute, as for every library. Windows (a
    `PatchStream`) train on the masked MSE; samples are windows.
    """
    windows = isinstance(train, PatchStream)
    steps = train.steps_per_epoch()
    context.copies.note = COPY_NOTE
    with context.phase("probe"):
        resident = resident_dataset(context.resident_batches(train))
    with context.phase("warmup"):
        compile_model(model, lr, epochs * steps, alpha, masked=windows)
        warm_up(model, resident, validates=val is not None)
    log = EpochLog(context, context.task.samples[train.part], steps, epochs, first_epoch, of)
    iterator = iter(resident)
    last: list = []

    def step(_) -> None:
        last[:] = [model.train_function(iterator)]

    with context.probing(
        step,
        [None],
        planned_steps=epochs * steps,
        preserved=lambda: preserved(model),
        sync=lambda: last and float(last[0]["loss"]),
    ):
        model.fit(
            batches(train),
            epochs=epochs,
            validation_data=None if val is None else batches(val),
            shuffle=False,
            verbose=0,
            callbacks=[log],
        )
    return log


def fit_arrays(
    model: keras.Model,
    context: Context,
    x: np.ndarray,
    y: np.ndarray,
    val: tuple[np.ndarray, np.ndarray] | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    alpha: float = 0.0,
    seed: int = 0,
) -> list[EpochLoss]:
    """Compile and train on in-memory arrays (a small labelled set: fine-tuning), reshuffled
    every epoch; Adam with a cosine decay over all the steps; compile and tracing booked as
    warm-up. Returns every epoch's losses."""
    context.copies.note = COPY_NOTE
    train = array_dataset(x, y, batch_size, seed)
    validation = None if val is None else array_dataset(*val, EVAL_BATCH)
    with context.phase("warmup"):
        compile_model(model, lr, epochs * steps_per_epoch(len(y), batch_size), alpha)
        warm_up(model, array_dataset(x, y, batch_size), validates=val is not None)
    log = EpochLog(None, len(y), steps_per_epoch(len(y), batch_size), epochs)
    model.fit(
        train, epochs=epochs, validation_data=validation, shuffle=False, verbose=0, callbacks=[log]
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


def predict(model: keras.Model, x: np.ndarray, device: str | None = None) -> np.ndarray:
    """Normalised predictions, float32, in batches of `EVAL_BATCH` pixels: 1-D for pixels
    `x[B, F]`, `[B, t, h, w]` for windows `x[B, C, h, w]` (on `device` when given, else in
    the enclosing device scope)."""
    if device is not None:
        with on_device(device):
            return predict(model, x)
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
