"""scikit-learn `HistGradientBoostingRegressor` on a seeded in-memory subsample of the
training part (`max_samples`), early-stopped on a subsample of the validation part.

Its loading is not part of the fit loop (no stream), so it has no stall. Epoch records are
the boosting curve at up to 10 points: `iterations` trees so far, training loss on the
10 000-sample subset scikit-learn scores, validation loss on the validation subsample (MSE,
normalised); HGB does not time its iterations, so each record gets its share of the fit time
in proportion to its iterations, and `samples` 0 (the fit's samples are `train_samples`).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np

from cubebench.case import Case as Base
from cubebench.models import log_boosting_curve

RECORDS = 10


class Case(Base):
    name = "sklearn-hgb"
    library = "scikit-learn"
    task = "lst-from-t2m"
    devices = ("cpu",)
    parameters: ClassVar[dict[str, Any]] = {
        "max_samples": 200_000,  # training subsample held in memory
        "max_val_samples": 100_000,  # validation subsample, for early stopping
        "max_iter": 300,
        "learning_rate": 0.1,
        "max_leaf_nodes": 31,
        "min_samples_leaf": 20,
        "l2_regularization": 0.0,
        "n_iter_no_change": 20,
    }
    # what the tests run it with on the tiny cube: short, and still learning
    test_parameters: ClassVar[dict[str, Any]] = {"max_iter": 30}

    def setup(self) -> None:
        from sklearn.ensemble import HistGradientBoostingRegressor

        p = self.params
        self.model = HistGradientBoostingRegressor(
            loss="squared_error",
            learning_rate=float(p["learning_rate"]),
            max_iter=int(p["max_iter"]),
            max_leaf_nodes=int(p["max_leaf_nodes"]),
            min_samples_leaf=int(p["min_samples_leaf"]),
            l2_regularization=float(p["l2_regularization"]),
            early_stopping=True,
            scoring="loss",
            n_iter_no_change=int(p["n_iter_no_change"]),
            random_state=self.context.seed,
        )

    def fit(self) -> None:
        from threadpoolctl import threadpool_limits

        p, context = self.params, self.context
        x, y = context.materialize("train", int(p["max_samples"]))
        xv, yv = context.materialize("val", int(p["max_val_samples"]))
        start = time.perf_counter()
        with threadpool_limits(context.threads):
            self.model.fit(x, y, X_val=xv, y_val=yv)
        seconds = time.perf_counter() - start
        context.train_samples = len(y)
        log_boosting_curve(context, self.model, seconds, records=RECORDS)

    def predict(self, x: np.ndarray) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(self.context.threads):
            return self.model.predict(x)
