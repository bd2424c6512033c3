"""Transfer learning with the Keras MLP: pretrain on the source region, fine-tune on a small
labelled fraction of the target region (twin: `torch_transfer.py`, same parameters).

Three predictors are evaluated on the target region's test part:

* `finetuned`: the source model fine-tuned on `target_fraction` of the target's training part
  (the first `freeze_layers` dense layers frozen);
* `source_only`: the source model applied to the target region unchanged;
* `scratch`: the same MLP, from the same initial weights as the pretraining, trained on the
  same small target set with the same fine-tuning budget (epochs, batch, learning rate).

`transfer_gain` = RMSE scratch / RMSE fine-tuned (> 1: pretraining helped). Epoch records:
the pretraining epochs (`stage` 0, losses on the source train/val parts), then the
fine-tuning epochs grouped into at most 10 records (`stage` 1, losses on the target sample and
the whole target validation part; `epochs` says how many each covers). The data stall of the
pretraining is estimated as in `keras_mlp.py` (fine-tuning reads no stream).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from cubebench.case import Case as Base
from cubebench.models import TRANSFER_PARAMETERS

FINETUNE_RECORDS = 10


class Case(Base):
    name = "keras-transfer"
    library = "keras"
    task = "lst-from-t2m-transfer"
    eval_part = "target_test"
    devices = ("cpu", "cuda")
    parameters: ClassVar[dict[str, Any]] = TRANSFER_PARAMETERS
    # what the tests run it with on the tiny cube: short, and still learning
    test_parameters: ClassVar[dict[str, Any]] = {
        "epochs": 3,
        "batch_size": 1024,
        "finetune_epochs": 4,
    }

    def setup(self) -> None:
        from cubebench.models import hidden_widths
        from cubebench.models import keras as km

        p = self.params
        km.seed_and_threads(self.context.seed, self.context.threads)
        n_features = len(self.context.task.spec.features)
        with km.device_scope(self.context.device):
            self.source = km.build_mlp(
                n_features, hidden_widths(p["hidden"]), p["activation"], seed=self.context.seed
            )
            self.initial = km.copy_model(self.source)  # the scratch model starts here too
        self.finetuned = self.scratch = None
        self.target_samples = 0

    def fit(self) -> None:
        from cubebench.models import keras as km
        from cubebench.models import log_grouped

        p, context, task = self.params, self.context, self.context.task
        epochs = int(p["epochs"])
        with km.device_scope(context.device):
            # 1. pretrain on the source region
            km.fit_stream(
                self.source,
                context,
                context.stream("train"),
                context.stream("val", shuffle=False, batch_size=int(p["val_batch_size"])),
                epochs=epochs,
                lr=float(p["learning_rate"]),
                alpha=float(p["min_lr_fraction"]),
                of=epochs + FINETUNE_RECORDS,
            )
            # 2. the small labelled target set (seeded), and the whole target validation part
            n = max(1, round(float(p["target_fraction"]) * task.samples["target_train"]))
            x, y = context.materialize("target_train", max_samples=n)
            val = context.materialize("target_val")
            self.target_samples = len(y)
            budget = {
                "epochs": int(p["finetune_epochs"]),
                "batch_size": int(p["finetune_batch_size"]),
                "lr": float(p["finetune_learning_rate"]),
                "seed": context.seed,
            }
            # 3. fine-tune a copy of the source model
            self.finetuned = km.copy_model(self.source)
            km.freeze(self.finetuned, int(p["freeze_layers"]))
            history = km.fit_arrays(self.finetuned, context, x, y, val, **budget)
            log_grouped(context, history, first_epoch=epochs, records=FINETUNE_RECORDS, stage=1.0)
            # 4. the same budget from the same initial weights, without pretraining
            self.scratch = self.initial
            km.fit_arrays(self.scratch, context, x, y, val, **budget)
        finetune_samples = 2 * budget["epochs"] * len(y)  # fine-tuned and scratch models
        context.train_samples = epochs * task.samples["train"] + finetune_samples

    def _predict(self, model, x: np.ndarray) -> np.ndarray:
        from cubebench.models import keras as km

        with km.device_scope(self.context.device):
            return km.predict(model, x)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._predict(self.finetuned, x)

    def predictors(self):
        return {
            "finetuned": self.predict,
            "source_only": lambda x: self._predict(self.source, x),
            "scratch": lambda x: self._predict(self.scratch, x),
        }

    def extra_metrics(self, rmse_by_predictor: dict[str, float]) -> dict[str, float]:
        def ratio(a: str, b: str) -> float | None:
            rmse = rmse_by_predictor
            return rmse[a] / rmse[b] if rmse.get(b) else None

        return {
            "transfer_gain": ratio("scratch", "finetuned"),
            "source_gain": ratio("source_only", "finetuned"),
            "target_train_samples": self.target_samples,
        }
