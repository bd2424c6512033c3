"""PyTorch MLP on the streamed batches: one half of the fairness twins (see `keras_mlp.py`).

The model, optimiser and loops live in `cubebench.models.torch`; `keras-mlp` trains the same
model with the same hyperparameters (both read `cubebench.models.MLP_PARAMETERS`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from cubebench.case import Case as Base
from cubebench.models import MLP_PARAMETERS


class Case(Base):
    name = "torch-mlp"
    library = "torch"
    task = "lst-from-t2m"
    devices = ("cpu", "cuda")
    distributed = True  # `run --nproc N`: DDP over N ranks
    parameters: ClassVar[dict[str, Any]] = MLP_PARAMETERS
    # what the tests run it with on the tiny cube: short, and still learning
    test_parameters: ClassVar[dict[str, Any]] = {"epochs": 3, "batch_size": 1024}

    def setup(self) -> None:
        from cubebench.models import hidden_widths
        from cubebench.models import torch as tm

        p = self.params
        tm.seed_and_threads(self.context.seed, self.context.threads)
        n_features = len(self.context.task.spec.features)
        self.model = tm.build_mlp(
            n_features, hidden_widths(p["hidden"]), p["activation"], seed=self.context.seed
        ).to(self.context.device)

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
