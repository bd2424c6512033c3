"""Keras 3 U-Net filling LST gaps in windows (tf.data): the fairness twin of `torch_cnn.py`.

The same model and hyperparameters as `torch-cnn` (see `cubebench.models.keras`), trained with
`model.fit` over `cubebench.loading.tf.dataset`, whose windows come as `(x, packed)`: the
target and its mask in one tensor, unpacked by the masked loss. The model takes channels-first
windows like torch's and permutes inside (TensorFlow's CPU convolutions are channels-last
only). The data stall is estimated as in `keras_mlp.py`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from cubebench.case import Case as Base
from cubebench.models import CNN_PARAMETERS


class Case(Base):
    name = "keras-cnn"
    library = "keras"
    task = "lst-gapfill"
    devices = ("cpu", "cuda")
    parameters: ClassVar[dict[str, Any]] = CNN_PARAMETERS
    # what the tests run it with on the tiny cube: short, and still learning
    test_parameters: ClassVar[dict[str, Any]] = {"epochs": 3, "batch_size": 16}

    def setup(self) -> None:
        from cubebench.models import hidden_widths, window_shape
        from cubebench.models import keras as km

        km.seed_and_threads(self.context.seed, self.context.threads)
        channels, (t, h, w) = window_shape(self.context.task)
        widths = hidden_widths(self.params["widths"], "widths")
        with km.device_scope(self.context.device):
            self.model = km.build_unet(channels, t, (h, w), widths, seed=self.context.seed)

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
