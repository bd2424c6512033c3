"""Bases of the case files: a case is its model and its parameters, the rest is here.

- `TorchCase`, `KerasCase` (`NetworkCase`): a network trained on the streams by its
  framework's one loop. `library` names the framework, and with it the module of
  `cubebench.models` that holds the framework's code (`torch.py`, `keras.py`, each with the
  same functions: `seed_and_threads`, `on_device`, `to_device`, `fit_stream`, `fit_arrays`,
  `predict`, `copy_model`, `freeze`, `build_mlp`, `build_unet`). The framework-free half of
  training (the epochs, the learning-rate schedule over the steps, the streams, the logging,
  the warm-up and the compute probe of the stall) is `cubebench.case.Context`'s and the
  loops', the same for both. A case builds its model in one hook, `build(fw)`.
- `MLP`, `UNet`, `Transfer`: the models and task of the fairness twins, mixed into a
  framework base: `class Case(MLP, TorchCase)` and `class Case(MLP, KerasCase)` differ in
  their name and library only.
- `EstimatorCase`: a scikit-learn-API estimator fitted in memory on a seeded subsample of the
  training part, early-stopped on a subsample of the validation part (gradient boosting:
  scikit-learn's, XGBoost, LightGBM); its boosting curve is logged as epochs.

No framework is imported here: the adapter modules are imported when a case first needs them
(`cubebench list` imports every case file and must not load TensorFlow).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from cubebench.case import Case, Predict
from cubebench.models import (
    CNN_PARAMETERS,
    MLP_PARAMETERS,
    TRANSFER_PARAMETERS,
    hidden_widths,
    log_curve,
    log_grouped,
    window_shape,
)

FINETUNE_RECORDS = 10  # fine-tuning epochs are logged grouped into at most this many records


class NetworkCase(Case):
    """A neural network of `library`'s framework, trained on the part's streams."""

    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")

    @property
    def fw(self) -> ModuleType:
        """The framework's module of `cubebench.models` (imported on first use)."""
        return importlib.import_module(f"cubebench.models.{self.library}")

    def build(self, fw: ModuleType) -> Any:
        """The model, untrained (seeds and threads are set; inside the device's scope)."""
        raise NotImplementedError

    def setup(self) -> None:
        fw, context = self.fw, self.context
        fw.seed_and_threads(context.seed, context.threads)
        with fw.on_device(context.device):
            self.model = fw.to_device(self.build(fw), context.device)

    def train_on_streams(self, model: Any, *, first_epoch: int = 0, of: int | None = None):
        """Fit `model` on the training part's stream (validation part's each epoch) for the
        `epochs`, at `learning_rate` with a cosine decay to `min_lr_fraction` of it."""
        p, context = self.params, self.context
        with self.fw.on_device(context.device):
            self.fw.fit_stream(
                model,
                context,
                context.stream("train"),
                context.stream("val", shuffle=False, batch_size=int(p["val_batch_size"])),
                epochs=int(p["epochs"]),
                lr=float(p["learning_rate"]),
                alpha=float(p["min_lr_fraction"]),
                first_epoch=first_epoch,
                of=of,
            )

    def fit(self) -> None:
        self.train_on_streams(self.model)

    def predict_with(self, model: Any, x: np.ndarray) -> np.ndarray:
        with self.fw.on_device(self.context.device):
            return self.fw.predict(model, x, self.context.device)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_with(self.model, x)


class TorchCase(NetworkCase):
    """A PyTorch network (`cubebench.models.torch`). `distributed = True` lets it train as
    N DDP ranks under `cubebench run --nproc N`."""

    library = "torch"


class KerasCase(NetworkCase):
    """A Keras 3 network on TensorFlow (`cubebench.models.keras`): `model.fit` over the
    streams' `tf.data` pipelines."""

    library = "keras"


class MLP:
    """The MLP of the pixel task: `hidden` dense layers and a linear output."""

    task: ClassVar[str] = "lst-from-t2m"
    parameters: ClassVar[dict[str, Any]] = MLP_PARAMETERS
    test_parameters: ClassVar[dict[str, Any]] = {"epochs": 3, "batch_size": 1024}

    def build(self, fw: ModuleType) -> Any:
        p, context = self.params, self.context  # type: ignore[attr-defined]
        n_features = len(context.task.spec.features)
        hidden = hidden_widths(p["hidden"])
        return fw.build_mlp(n_features, hidden, p["activation"], seed=context.seed)


class UNet:
    """The U-Net of the gap-filling task, trained on the MSE of the pixels to fill."""

    task: ClassVar[str] = "lst-gapfill"
    parameters: ClassVar[dict[str, Any]] = CNN_PARAMETERS
    test_parameters: ClassVar[dict[str, Any]] = {"epochs": 3, "batch_size": 16}

    def build(self, fw: ModuleType) -> Any:
        context = self.context  # type: ignore[attr-defined]
        channels, (t, h, w) = window_shape(context.task)
        widths = hidden_widths(self.params["widths"], "widths")  # type: ignore[attr-defined]
        return fw.build_unet(channels, t, (h, w), widths, seed=context.seed)


class Transfer(MLP):
    """Pretrain the MLP on the source region, fine-tune a copy on a small labelled fraction of
    the target region; three predictors are evaluated on the target region's test part:

    * `finetuned`: the source model fine-tuned on `target_fraction` of the target's training
      part (its first `freeze_layers` dense layers frozen);
    * `source_only`: the source model applied to the target region unchanged;
    * `scratch`: the same MLP, from the same initial weights as the pretraining, trained on
      the same small target set with the same budget (epochs, batch, learning rate).

    `transfer_gain` = RMSE scratch / RMSE fine-tuned (> 1: pretraining helped). Epoch records:
    the pretraining epochs (losses on the source train/val parts), then the fine-tuning
    epochs grouped into at most FINETUNE_RECORDS records (`stage` 1, losses on the target
    sample and the whole target validation part; `epochs` says how many each covers).
    """

    task: ClassVar[str] = "lst-from-t2m-transfer"
    eval_part: ClassVar[str] = "target_test"
    parameters: ClassVar[dict[str, Any]] = TRANSFER_PARAMETERS
    test_parameters: ClassVar[dict[str, Any]] = {
        "epochs": 3,
        "batch_size": 1024,
        "finetune_epochs": 4,
    }

    def setup(self) -> None:
        super().setup()  # type: ignore[misc]
        self.source = self.model
        with self.fw.on_device(self.context.device):
            self.initial = self.fw.copy_model(self.source)  # the scratch model starts here
        self.finetuned = self.scratch = None
        self.target_samples = 0

    def fit(self) -> None:
        p, context, task, fw = self.params, self.context, self.context.task, self.fw
        epochs = int(p["epochs"])
        # 1. pretrain on the source region
        self.train_on_streams(self.source, of=epochs + FINETUNE_RECORDS)
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
        with fw.on_device(context.device):
            # 3. fine-tune a copy of the source model
            self.finetuned = fw.copy_model(self.source)
            fw.freeze(self.finetuned, int(p["freeze_layers"]))
            history = fw.fit_arrays(self.finetuned, context, x, y, val, **budget)
            log_grouped(context, history, first_epoch=epochs, records=FINETUNE_RECORDS, stage=1.0)
            # 4. the same budget from the same initial weights, without pretraining
            self.scratch = self.initial
            fw.fit_arrays(self.scratch, context, x, y, val, **budget)
        finetune_samples = 2 * budget["epochs"] * len(y)  # fine-tuned and scratch models
        context.train_samples = epochs * task.samples["train"] + finetune_samples

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_with(self.finetuned, x)

    def predictors(self) -> dict[str, Predict]:
        return {
            "finetuned": self.predict,
            "source_only": lambda x: self.predict_with(self.source, x),
            "scratch": lambda x: self.predict_with(self.scratch, x),
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


class EstimatorCase(Case):
    """A gradient-boosting estimator with scikit-learn's API, fitted in memory on a seeded
    subsample of `max_samples` training samples, early-stopped on `max_val_samples` of the
    validation part. Its loading is not part of a training loop (no stream), so it has no
    stall. A case file gives `estimator()` and, where the library's API differs from
    scikit-learn's, `fit_estimator` and `curve`.

    Epoch records are the boosting curve at up to RECORDS points (`iterations` so far, MSE on
    the training and validation samples the library scores, normalised units); the library
    does not time its iterations, so each record gets its share of the fit time in proportion
    to its iterations, and `samples` 0 (the fit's samples are `train_samples`)."""

    RECORDS: ClassVar[int] = 10
    task: ClassVar[str] = "lst-from-t2m"
    test_parameters: ClassVar[dict[str, Any]] = {"max_iter": 30}

    def estimator(self) -> Any:
        """The unfitted estimator, seeded with `self.context.seed`, using
        `self.context.threads` threads."""
        raise NotImplementedError

    def fit_estimator(self, x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray):
        """Fit with early stopping on (xv, yv): scikit-learn's `X_val`, `y_val`."""
        self.model.fit(x, y, X_val=xv, y_val=yv)

    def curve(self) -> tuple[Sequence[float], Sequence[float]]:
        """Training and validation MSE after 0, 1, 2... iterations (scikit-learn's scores
        are -loss, the loss half the squared error)."""
        train = -2.0 * np.asarray(self.model.train_score_)
        return train, -2.0 * np.asarray(self.model.validation_score_)

    def setup(self) -> None:
        self.model = self.estimator()

    def fit(self) -> None:
        from threadpoolctl import threadpool_limits

        p, context = self.params, self.context
        x, y = context.materialize("train", int(p["max_samples"]))
        xv, yv = context.materialize("val", int(p["max_val_samples"]))
        start = time.perf_counter()
        with threadpool_limits(context.threads):
            self.fit_estimator(x, y, xv, yv)
        seconds = time.perf_counter() - start
        context.train_samples = len(y)
        train, val = self.curve()
        log_curve(context, train, val, seconds, records=self.RECORDS)

    def predict(self, x: np.ndarray) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(self.context.threads):
            return np.asarray(self.model.predict(x))
