"""PyTorch U-Net filling LST gaps in windows: one half of the fairness twins (see
`keras_cnn.py`).

The model sees a window's air temperature, its visible LST (with the visibility mask) and the
coordinate planes, and is trained on the MSE of the hidden pixels only. The model, optimiser
and loops live in `cubebench.models.torch`; `keras-cnn` trains the same U-Net with the same
hyperparameters (both read `cubebench.models.CNN_PARAMETERS`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from cubebench.case import Case as Base
from cubebench.models import CNN_PARAMETERS


class Case(Base):
    name = "torch-cnn"
    library = "torch"
    task = "lst-gapfill"
    devices = ("cpu", "cuda")
    distributed = True  # `run --nproc N`: DDP over N ranks
    parameters: ClassVar[dict[str, Any]] = CNN_PARAMETERS
    # what the tests run it with on the tiny cube: short, and still learning
    test_parameters: ClassVar[dict[str, Any]] = {"epochs": 3, "batch_size": 16}

    def setup(self) -> None:
        from cubebench.models import hidden_widths, window_shape
        from cubebench.models import torch as tm

        tm.seed_and_threads(self.context.seed, self.context.threads)
        channels, (t, _, _) = window_shape(self.context.task)
        widths = hidden_widths(self.params["widths"], "widths")
        self.model = tm.build_unet(channels, t, widths, seed=self.context.seed).to(
            self.context.device
        )

    def fit(self) -> None:
        from cubebench.models import torch as tm

        p, context = self.params, self.context
        tm.fit_stream(
            self.model,
            context,
            context.stream("train"),
            context.stream("val", shuffle=False, batch_size=int(p["val_batch_size"])),
            epochs=int(p["epochs"]),
            lr=float(p["learning_rate"]),
            alpha=float(p["min_lr_fraction"]),
        )

    def predict(self, x: np.ndarray) -> np.ndarray:
        from cubebench.models import torch as tm

        return tm.predict(self.model, x, self.context.device)
