"""Keras 3 MLP on the streamed batches (tf.data): the fairness twin of `torch_mlp.py`.

The same model and hyperparameters as `torch-mlp` (see `cubebench.models.keras`), trained with
`model.fit` over `cubebench.loading.tf.dataset` (each pass is the next epoch). Keras runs the
input pipeline inside its graph, so the data stall is estimated, not measured: after the fit,
30 training steps are timed on one cached batch and stall = training time (validation
excluded) - first step (graph tracing) - the other steps x that step time.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from cubebench.case import Case as Base
from cubebench.models import MLP_PARAMETERS


class Case(Base):
    name = "keras-mlp"
    library = "keras"
    task = "lst-from-t2m"
    devices = ("cpu", "cuda")
    parameters: ClassVar[dict[str, Any]] = MLP_PARAMETERS
    # what the tests run it with on the tiny cube: short, and still learning
    test_parameters: ClassVar[dict[str, Any]] = {"epochs": 3, "batch_size": 1024}

    def setup(self) -> None:
        from cubebench.models import hidden_widths
        from cubebench.models import keras as km

        p = self.params
        km.seed_and_threads(self.context.seed, self.context.threads)
        n_features = len(self.context.task.spec.features)
        with km.device_scope(self.context.device):
            self.model = km.build_mlp(
                n_features, hidden_widths(p["hidden"]), p["activation"], seed=self.context.seed
            )

    def fit(self) -> None:
        from cubebench.models import keras as km

        p, context = self.params, self.context
        with km.device_scope(context.device):
            km.fit_stream(
                self.model,
                context,
                context.stream("train"),
                context.stream("val", shuffle=False, batch_size=int(p["val_batch_size"])),
                epochs=int(p["epochs"]),
                lr=float(p["learning_rate"]),
                alpha=float(p["min_lr_fraction"]),
            )

    def predict(self, x: np.ndarray) -> np.ndarray:
        from cubebench.models import keras as km

        with km.device_scope(self.context.device):
            return km.predict(self.model, x)
