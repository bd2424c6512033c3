"""TensorFlow adapter: a `tf.data.Dataset` of ready-made batches, prefetched.

Batches are built by the numpy stream (decode threads, no per-sample Python) and handed to
tf.data whole; `prefetch` overlaps them with the training step.
"""

from __future__ import annotations

import tensorflow as tf

from cubebench.loading.stream import ChunkStream


def dataset(stream: ChunkStream, epoch: int = 0, prefetch: int = 2) -> tf.data.Dataset:
    """One epoch of `(X[B, F], y[B])` float32 batches."""
    features = len(stream.task.spec.features)
    signature = (
        tf.TensorSpec(shape=(None, features), dtype=tf.float32),
        tf.TensorSpec(shape=(None,), dtype=tf.float32),
    )
    return tf.data.Dataset.from_generator(
        lambda: stream.batches(epoch), output_signature=signature
    ).prefetch(prefetch)
