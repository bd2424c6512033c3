"""TensorFlow adapter: a `tf.data.Dataset` of ready-made batches, prefetched.

Batches are built by the numpy stream (decode threads, no per-sample Python). Crossing from
Python into tf.data costs a fixed few hundred microseconds per element, so full batches travel
in groups of `group` (stacked to (k, B, F)) and are split again by `unbatch` in C++.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from cubebench.loading.stream import ChunkStream


def _grouped(
    stream: ChunkStream, epoch: int, group: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    xs, ys = [], []
    for x, y in stream.batches(epoch):
        if len(y) != stream.batch_size:  # the last, partial batch travels alone, in order
            if xs:
                yield np.stack(xs), np.stack(ys)
                xs, ys = [], []
            yield x[None], y[None]
            continue
        xs.append(x)
        ys.append(y)
        if len(xs) == group:
            yield np.stack(xs), np.stack(ys)
            xs, ys = [], []
    if xs:
        yield np.stack(xs), np.stack(ys)


def dataset(
    stream: ChunkStream, epoch: int = 0, prefetch: int = 4, group: int = 8
) -> tf.data.Dataset:
    """One epoch of `(X[B, F], y[B])` float32 batches, in the stream's order."""
    features = len(stream.task.spec.features)
    signature = (
        tf.TensorSpec(shape=(None, None, features), dtype=tf.float32),
        tf.TensorSpec(shape=(None, None), dtype=tf.float32),
    )
    grouped = tf.data.Dataset.from_generator(
        lambda: _grouped(stream, epoch, group), output_signature=signature
    )
    return grouped.unbatch().prefetch(prefetch)
