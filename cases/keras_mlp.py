"""Keras 3 MLP on the streamed batches (tf.data): the fairness twin of `torch_mlp.py`.

The same model, hyperparameters and schedule as `torch-mlp` (`cubebench.models.bases.MLP`),
trained with `model.fit` over `cubebench.loading.tf.dataset` (`cubebench.models.keras`).
"""

from __future__ import annotations

from cubebench.models.bases import MLP, KerasCase


class Case(MLP, KerasCase):
    name = "keras-mlp"
