"""PyTorch MLP on the streamed batches: one half of the fairness twins (see `keras_mlp.py`).

The model, optimiser and loops live in `cubebench.models.torch`; `keras-mlp` trains the same
model with the same hyperparameters (keep the two `parameters` dicts equal).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from cubebench.case import Case as Base


class Case(Base):
    name = "torch-mlp"
    library = "torch"
    task = "lst-from-t2m"
    devices = ("cpu", "cuda")
    parameters: ClassVar[dict[str, Any]] = {
        "epochs": 6,
        "batch_size": 2048,
        "hidden": [64, 64],
        "activation": "relu",
        "learning_rate": 3e-3,
        "min_lr_fraction": 0.0,  # cosine decay per step from learning_rate to this fraction
        "val_batch_size": 65536,
    }

    def setup(self) -> None:
        from cubebench.models import hidden_widths
        from cubebench.models import torch as tm

        p = self.p = {**self.parameters, **self.params}
        tm.seed_and_threads(self.context.seed, self.context.threads)
        n_features = len(self.context.task.spec.features)
        self.model = tm.build_mlp(
            n_features, hidden_widths(p["hidden"]), p["activation"], seed=self.context.seed
        ).to(self.context.device)

    def fit(self) -> None:
        from cubebench.models import torch as tm

        p, context = self.p, self.context
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
