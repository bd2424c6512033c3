"""TensorFlow adapter: a `tf.data.Dataset` of ready-made batches.

The numpy stream does the work (decode threads, no per-sample Python) and hands tf.data whole
mixed groups of K chunks through `numpy_function`; `rebatch` cuts them into batches in C++.
Crossing from Python into tf.data has a fixed cost per element (`from_generator` costs about
twice as much per element), so it is paid per group, not per batch. The batches equal
`ChunkStream.batches` exactly: both cut the same sequence of groups.

No device prefetch (torch's `to_device` has one). Keras 3 does not add one: its
`TFEpochIterator.__init__` (keras/src/backend/tensorflow/trainer.py) hands the dataset to
`strategy.experimental_distribute_dataset`, which under the default strategy (no strategy
scope, as here: `cubebench.models.keras.on_device` is a `tf.device` scope) returns it
unchanged (`_DefaultDistributionExtended._experimental_distribute_dataset`, tensorflow's
distribute/distribute_lib.py): each batch crosses to the GPU inside the train function.
`tf.data.experimental.prefetch_to_device` is not used because it must be the pipeline's
last transformation and it drops the cardinality (`assert_cardinality(10)` then
`prefetch_to_device` gives -2, unknown; TF 2.21), which `cubebench.models.keras.batches`
declares after this pipeline so that Keras knows the epoch's length; a transformation after
it brings the data back to the host (tensorflow/tensorflow#37277). It could not be tried on
a GPU here either. The stall stays consistent: Keras' compute probe runs the same train
function on host-resident batches, so the copy counts as compute in the loop and the probe
alike. The route to a device prefetch is a `OneDeviceStrategy` scope (its distributed
dataset prefetches to the device), a change of where the models are built.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from cubebench.loading import PatchStream, Stream


class _Epochs:
    """Each pass over the dataset is the next epoch, as Keras' `fit(epochs=N)` expects."""

    def __init__(self, stream: Stream, first_epoch: int):
        self.stream = stream
        self.next_epoch = first_epoch
        self.groups: Iterator[tuple[np.ndarray, np.ndarray]] | None = None
        self.started = 0.0

    def group(self, index: np.int64) -> tuple[np.ndarray, np.ndarray]:
        stats = self.stream.stats
        if index == 0:  # a new pass: a new epoch
            self.groups = self.stream.groups(self.next_epoch)
            self.next_epoch += 1
            self.started = time.perf_counter()
            stats.epochs += 1
        x, y, *mask = next(self.groups)
        if stats.time_to_first_batch_s is None and len(y):  # the first batch follows in C++
            stats.time_to_first_batch_s = time.perf_counter() - self.started
        stats.samples += len(y)
        if mask:  # windows: the target and its mask travel as one tensor (Keras' y)
            return x, np.concatenate([y, mask[0]], axis=1)
        return x, y


def dataset(stream: Stream, epoch: int = 0, prefetch: int = 2) -> tf.data.Dataset:
    """`(X[B, F], y[B])` float32 batches in the stream's order; pass k is epoch `epoch + k`.

    Windows (a `PatchStream`) come as `(x[B, C, h, w], packed[B, 2t, h, w])`: the target's
    t planes, then its mask's, for a loss that unpacks them.
    """
    if isinstance(stream, PatchStream):
        t, h, w = stream.window
        shapes = (None, stream.channels, h, w), (None, 2 * t, h, w)
    else:
        shapes = (None, len(stream.task.spec.features)), (None,)
    epochs = _Epochs(stream, epoch)

    def group(index):
        x, y = tf.numpy_function(epochs.group, [index], (tf.float32, tf.float32), stateful=True)
        return tf.ensure_shape(x, shapes[0]), tf.ensure_shape(y, shapes[1])

    groups = tf.data.Dataset.range(stream.group_count(epoch)).map(group)  # sequential
    batches = groups.rebatch(stream.batch_size, drop_remainder=stream.drop_last)
    return batches.prefetch(prefetch).with_options(_lean_options())


def _lean_options() -> tf.data.Options:
    """One tf.data thread and no autotuning: the work is in the stream's decode threads, and
    tf.data's own thread pool and autotuner only compete with them for the cores (measured:
    +20 % pairs/s on 2 cores, ratio to raw decode 0.24-0.32 -> 0.33-0.38)."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    return options
