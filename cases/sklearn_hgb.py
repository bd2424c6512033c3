"""scikit-learn `HistGradientBoostingRegressor` on a seeded in-memory subsample of the
training part (`max_samples`), early-stopped on a subsample of the validation part
(`cubebench.models.bases.EstimatorCase`: the boosting curve is logged as epochs).
"""

from __future__ import annotations

from typing import Any, ClassVar

from cubebench.models.bases import EstimatorCase


class Case(EstimatorCase):
    name = "sklearn-hgb"
    library = "scikit-learn"
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

    def estimator(self) -> Any:
        from sklearn.ensemble import HistGradientBoostingRegressor

        p = self.params
        return HistGradientBoostingRegressor(
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
