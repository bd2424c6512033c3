"""The Keras half of the fairness twins: the MLP, its optimiser and its training helpers.

The same model as `cubebench.models.torch`: the same layers and widths, activation,
Glorot-uniform weights and zero biases, Adam with the same learning rate, epsilon and cosine
schedule, the same batch size, epochs and MSE loss.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from cubebench.case import Context
from cubebench.loading.stream import ChunkStream
from cubebench.loading.tf import dataset
from cubebench.models import EpochLoss

ACTIVATIONS = ("relu", "silu", "tanh", "gelu")
EPSILON = 1e-7  # Adam's epsilon, the same in both frameworks
EVAL_BATCH = 65536
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
    model: keras.Model, lr: float, decay_steps: int = 0, alpha: float = 0.0
) -> keras.Model:
    """Adam with a per-step cosine decay to `alpha * lr` over `decay_steps` (0: constant), MSE."""
    rate = (
        keras.optimizers.schedules.CosineDecay(lr, decay_steps, alpha=alpha)
        if decay_steps > 0
        else lr
    )
    model.compile(optimizer=keras.optimizers.Adam(rate, epsilon=EPSILON), loss="mse")
    return model


def steps_per_epoch(samples: int, batch_size: int) -> int:
    return max(1, -(-int(samples) // int(batch_size)))


def batches(stream: ChunkStream) -> tf.data.Dataset:
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
    train: ChunkStream,
    val: ChunkStream | None,
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
    """
    steps = steps_per_epoch(context.task.samples[train.part], train.batch_size)
    compile_model(model, lr, epochs * steps, alpha)
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
    probe = ChunkStream(
        context.task, train.part, train.batch_size, shuffle=False, threads=context.threads
    )
    first_batches = probe.batches(0)
    x, y = next(first_batches)
    first_batches.close()
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
        n_features = model.inputs[0].shape[-1]
        function = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec((None, n_features), tf.float32)],
        )
        _predict_functions[model] = function
    return function


def warm_up_predict(model: keras.Model) -> None:
    """Trace `predict`'s forward pass now (at the end of the fit), not in the first call."""
    predict(model, np.zeros((1, model.inputs[0].shape[-1]), np.float32))


def predict(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Normalised predictions, 1-D float32, in batches of `EVAL_BATCH`."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(len(x), np.float32)
    function = _predict_function(model)
    for start in range(0, len(x), EVAL_BATCH):
        part = x[start : start + EVAL_BATCH]
        out[start : start + len(part)] = function(part).numpy().reshape(-1)
    return out
