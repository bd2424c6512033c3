"""scikit-learn `SGDRegressor` streamed with `partial_fit` over the shuffled training batches.

The DeepESDL notebook's model done right: normalised features and target, shuffled batches,
several epochs, and averaged SGD (ASGD: the prediction uses the running average of the
weights) with an inverse-scaling step size eta0 / t^power_t, t counting samples. Without
averaging, the last iterate wanders with the chunk-ordered batches; with it, a few epochs come
within a few percent of the least-squares fit. A linear model: no accuracy target.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np

from cubebench.case import Case as Base


class Case(Base):
    name = "sklearn-sgd"
    library = "scikit-learn"
    task = "lst-from-t2m"
    devices = ("cpu",)
    parameters: ClassVar[dict[str, Any]] = {
        "epochs": 5,
        "batch_size": 16384,  # partial_fit updates per sample: the batch only sets call overhead
        "learning_rate": "invscaling",
        "eta0": 0.05,
        "power_t": 0.5,
        "average": True,
        "alpha": 1e-6,  # L2 penalty
        "val_batch_size": 65536,
    }

    def setup(self) -> None:
        from sklearn.linear_model import SGDRegressor

        p = self.params
        self.model = SGDRegressor(
            loss="squared_error",
            penalty="l2",
            alpha=float(p["alpha"]),
            learning_rate=p["learning_rate"],
            eta0=float(p["eta0"]),
            power_t=float(p["power_t"]),
            average=p["average"],
            random_state=self.context.seed,
        )

    def fit(self) -> None:
        p, context = self.params, self.context
        epochs = int(p["epochs"])
        train = context.stream("train")
        val = context.stream("val", shuffle=False, batch_size=int(p["val_batch_size"]))
        fitted = False
        for epoch in range(epochs):
            start = time.perf_counter()
            total, samples = 0.0, 0
            for x, y in context.timed_batches(train, epoch):
                if fitted:  # progressive loss: each batch is scored before it is learnt
                    total += float(np.sum((self.model.predict(x) - y) ** 2))
                    samples += len(y)
                self.model.partial_fit(x, y)
                fitted = True
            seconds = time.perf_counter() - start
            context.log_epoch(
                epoch,
                total / samples if samples else None,
                self._mse(val),
                seconds=seconds,
                samples=context.task.samples["train"],
                of=epochs,
            )

    def _mse(self, stream) -> float:
        total, n = 0.0, 0
        for x, y in stream.batches(0):
            total += float(np.sum((self.model.predict(x) - y) ** 2))
            n += len(y)
        return total / max(n, 1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x)
