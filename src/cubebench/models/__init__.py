"""Shared model code of the framework cases: `cubebench.models.torch` and
`cubebench.models.keras` build the same MLP and the same U-Net (the fairness twins). This
module stays framework-free."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cubebench.case import Context
from cubebench.loading.patches import channel_names
from cubebench.task import PreparedTask

# The fairness twins train with the same hyperparameters: both read them from here.
MLP_PARAMETERS: dict[str, Any] = {
    "epochs": 6,
    "batch_size": 2048,
    "hidden": [64, 64],
    "activation": "relu",
    "learning_rate": 3e-3,
    "min_lr_fraction": 0.0,  # cosine decay per step from learning_rate to this fraction
    "val_batch_size": 65536,
}
TRANSFER_PARAMETERS: dict[str, Any] = {
    **MLP_PARAMETERS,  # epochs: pretraining epochs on the source region
    "target_fraction": 0.01,  # labelled share of the target's training part
    "freeze_layers": 0,  # dense layers frozen during fine-tuning, from the input
    "finetune_epochs": 50,  # also the scratch model's budget
    "finetune_batch_size": 128,
    "finetune_learning_rate": 1e-3,
}
# The U-Net twins of the patch task (gap filling): one level per width, 2x2 pooling between
# levels, a bottleneck twice the last width; the loss covers the pixels to fill only.
CNN_PARAMETERS: dict[str, Any] = {
    "epochs": 6,
    "batch_size": 32,  # windows
    "widths": [16, 32],
    "learning_rate": 2e-3,
    "min_lr_fraction": 0.0,
    "val_batch_size": 256,
}


@dataclass(frozen=True)
class EpochLoss:
    """One epoch of a training loop on in-memory arrays (fine-tuning), before logging."""

    train_loss: float
    val_loss: float | None
    seconds: float
    samples: int


def log_grouped(
    context: Context,
    history: list[EpochLoss],
    *,
    first_epoch: int,
    records: int = 10,
    **extra: float,
) -> int:
    """Log a long run of short epochs as at most `records` epoch records, so that loss plots
    stay readable: each record has the sample-weighted mean training loss of its epochs, the
    validation loss after its last epoch, and their summed seconds and samples. The record
    also carries `epochs`, how many epochs it covers. Returns the next free epoch index."""
    if not history:
        return first_epoch
    per = -(-len(history) // max(1, records))
    groups = [history[i : i + per] for i in range(0, len(history), per)]
    for k, group in enumerate(groups):
        samples = sum(e.samples for e in group)
        train = sum(e.train_loss * e.samples for e in group) / max(samples, 1)
        context.log_epoch(
            first_epoch + k,
            train,
            group[-1].val_loss,
            seconds=sum(e.seconds for e in group),
            samples=samples,
            of=first_epoch + len(groups),
            epochs=float(len(group)),
            **extra,
        )
    return first_epoch + len(groups)


def log_curve(
    context: Context,
    train: Sequence[float],
    val: Sequence[float],
    seconds: float,
    *,
    records: int = 10,
    **extra: float,
) -> None:
    """Log a boosting curve (training and validation MSE after 0, 1, 2... iterations: index 0
    is the model without any tree) at `records` evenly spaced iterations as epoch records,
    the fit `seconds` shared out by iterations, so that its loss curve sits beside the
    networks'. Each record carries `iterations`."""
    n_iter = len(train) - 1
    if n_iter < 1:
        return
    marks = sorted({max(1, round(k * n_iter / records)) for k in range(1, records + 1)})
    done = 0
    for epoch, it in enumerate(marks):
        context.log_epoch(
            epoch,
            float(train[it]),
            float(val[it]),
            seconds=seconds * (it - done) / n_iter,
            samples=0,
            of=len(marks),
            iterations=float(it),
            **extra,
        )
        done = it


def log_boosting_curve(
    context: Context, model: Any, seconds: float, *, records: int = 10, **extra: float
) -> None:
    """`log_curve` of a fitted scikit-learn gradient-boosting model (its scores are -loss,
    the loss half the squared error)."""
    train = -2.0 * np.asarray(model.train_score_)
    val = -2.0 * np.asarray(model.validation_score_)
    log_curve(context, train, val, seconds, records=records, **extra)


def hidden_widths(value, name: str = "hidden") -> tuple[int, ...]:
    """The `hidden` (or `widths`) parameter as a tuple of widths: a list, a tuple or a string
    `"64,64"`."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    widths = tuple(int(v) for v in value)
    if not widths or min(widths) < 1:
        raise ValueError(f"{name} must be positive layer widths, got {value!r}")
    return widths


def window_shape(task: PreparedTask) -> tuple[int, tuple[int, int, int]]:
    """(channels, (t, h, w)) of the task's windows, as its `PatchStream` cuts them: the model
    is built before any stream is handed to the case, and the channel layout is the loader's
    to define, not the case's."""
    patch = task.spec.patch
    if patch is None:
        raise ValueError(f"task {task.spec.name!r} samples pixels, not windows")
    t, h, w = patch.size
    return len(channel_names(task.spec, t)), (t, h, w)
