"""XGBoost's histogram gradient boosting on the same in-memory subsample as `sklearn-hgb`
(`cubebench.models.bases.EstimatorCase`), the same tree size (31 leaves, grown loss-guided),
learning rate and early stopping: the boosting library Earth-science users reach for next to
scikit-learn. Runs on the GPU with `--device cuda` (XGBoost's CUDA build, the `xgboost` wheel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from cubebench.models.bases import EstimatorCase


class Case(EstimatorCase):
    name = "xgboost-hist"
    library = "xgboost"
    devices = ("cpu", "cuda")
    parameters: ClassVar[dict[str, Any]] = {
        "max_samples": 200_000,
        "max_val_samples": 100_000,
        "n_estimators": 300,
        "learning_rate": 0.1,
        "max_leaves": 31,
        "min_child_weight": 20.0,
        "early_stopping_rounds": 20,
    }
    test_parameters: ClassVar[dict[str, Any]] = {"n_estimators": 30}

    def estimator(self) -> Any:
        from xgboost import XGBRegressor

        p = self.params
        return XGBRegressor(
            tree_method="hist",
            grow_policy="lossguide",
            max_depth=0,
            max_leaves=int(p["max_leaves"]),
            min_child_weight=float(p["min_child_weight"]),
            reg_lambda=0.0,  # no L2 penalty, as scikit-learn's default
            n_estimators=int(p["n_estimators"]),
            learning_rate=float(p["learning_rate"]),
            early_stopping_rounds=int(p["early_stopping_rounds"]),
            eval_metric="rmse",
            device=self.context.device,
            n_jobs=self.context.threads,
            random_state=self.context.seed,
        )

    def fit_estimator(self, x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray):
        # scored like scikit-learn's: 10 000 training samples, and the validation subsample
        self.model.fit(x, y, eval_set=[(x[:10_000], y[:10_000]), (xv, yv)], verbose=False)

    def curve(self) -> tuple[Sequence[float], Sequence[float]]:
        scores = self.model.evals_result()  # RMSE after each tree; index 0 (no tree) unscored
        train, val = (np.square(scores[k]["rmse"]) for k in ("validation_0", "validation_1"))
        return np.concatenate([[np.nan], train]), np.concatenate([[np.nan], val])
