"""scikit-learn `SGDRegressor` streamed with `partial_fit` over the shuffled training batches.

The DeepESDL notebook's model done right: normalised features and target, shuffled batches,
several epochs, and averaged SGD (ASGD: the prediction uses the running average of the
weights) with an inverse-scaling step size eta0 / t^power_t, t counting samples. Without
averaging, the last iterate wanders with the chunk-ordered batches; with it, a few epochs come
within a few percent of the least-squares fit. A linear model: no accuracy target.
"""

from __future__ import annotations

import contextlib
import copy
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
    # what the tests run it with on the tiny cube: short, and still learning
    test_parameters: ClassVar[dict[str, Any]] = {"epochs": 2, "batch_size": 2048}

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
        self.loss = [0.0, 0]  # progressive loss of the epoch: squared errors, samples
        train = context.stream("train")
        val = context.stream("val", shuffle=False, batch_size=int(p["val_batch_size"]))
        resident = context.resident_batches(train)
        probing = context.probing(
            self.step,
            resident,
            planned_steps=epochs * train.steps_per_epoch(),
            preserved=self._preserved,
        )
        with probing:
            for epoch in range(epochs):
                start, booked = time.perf_counter(), context.clock.snapshot()
                self.loss = [0.0, 0]
                for batch in context.timed_batches(train, epoch):
                    self.step(batch)
                seconds = time.perf_counter() - start - context.clock.since(booked, "probe")
                total, samples = self.loss
                context.log_epoch(
                    epoch,
                    total / samples if samples else None,
                    self._mse(val),
                    seconds=seconds,
                    samples=context.task.samples["train"],
                    of=epochs,
                )

    @contextlib.contextmanager
    def _preserved(self):
        """Probe steps learn on a copy: the model and the epoch's loss stay as they were."""
        model, loss = self.model, list(self.loss)
        self.model = copy.deepcopy(model)
        try:
            yield
        finally:
            self.model, self.loss = model, loss

    def step(self, batch: tuple[np.ndarray, np.ndarray]) -> None:
        """Score the batch before learning it (the progressive loss), then learn it."""
        x, y = batch
        if hasattr(self.model, "coef_"):
            self.loss[0] += float(np.sum((self.model.predict(x) - y) ** 2))
            self.loss[1] += len(y)
        self.model.partial_fit(x, y)

    def _mse(self, stream) -> float:
        total, n = 0.0, 0
        for x, y in stream.batches(0):
            total += float(np.sum((self.model.predict(x) - y) ** 2))
            n += len(y)
        return total / max(n, 1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x)
