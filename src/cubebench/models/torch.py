"""The PyTorch half of the fairness twins: the MLP, its optimiser and its training loops.

`cubebench.models.keras` builds the same model: the same layers and widths, activation,
Glorot-uniform weights and zero biases (set explicitly: torch's default init differs), Adam
with the same learning rate and cosine schedule, the same batch size, epochs and MSE loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cubebench.case import Context
from cubebench.loading.stream import ChunkStream
from cubebench.models import EpochLoss

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "gelu": nn.GELU}
EPSILON = 1e-7  # Adam's epsilon: Keras' default, set in both frameworks
EVAL_BATCH = 65536


def seed_and_threads(seed: int, threads: int) -> None:
    """Seed torch's generators and use `threads` CPU threads."""
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, int(threads)))


def build_mlp(
    n_features: int,
    hidden: Sequence[int] = (64, 64),
    activation: str = "relu",
    seed: int | None = None,
) -> nn.Sequential:
    """Dense layers of widths `hidden` and a linear output; Glorot-uniform weights, zero bias.

    With a `seed`, the weights come from a generator of that seed (the global one otherwise).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    layers: list[nn.Module] = []
    width = n_features
    for units in hidden:
        layers += [nn.Linear(width, int(units)), ACTIVATIONS[activation]()]
        width = int(units)
    layers.append(nn.Linear(width, 1))
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight, generator=generator)
                nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def dense_layers(model: nn.Sequential) -> list[nn.Linear]:
    return [m for m in model if isinstance(m, nn.Linear)]


def freeze(model: nn.Sequential, n_layers: int) -> None:
    """Freeze the first `n_layers` dense layers (weights and biases); unfreeze the rest."""
    layers = dense_layers(model)
    if not 0 <= n_layers < len(layers):
        raise ValueError(f"freeze_layers must be 0..{len(layers) - 1}, got {n_layers}")
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            p.requires_grad_(i >= n_layers)


def cosine_factor(step: int, decay_steps: int, alpha: float) -> float:
    """Keras' `CosineDecay` as a factor of the initial learning rate."""
    if decay_steps <= 0:
        return 1.0
    done = min(step, decay_steps) / decay_steps
    return (1.0 - alpha) * 0.5 * (1.0 + math.cos(math.pi * done)) + alpha


def optimizer(
    model: nn.Module, lr: float, decay_steps: int = 0, alpha: float = 0.0
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam over the trainable parameters with a per-step cosine decay to `alpha * lr` after
    `decay_steps` steps (0: constant). Step the scheduler after every optimiser step."""
    params = [p for p in model.parameters() if p.requires_grad]
    adam = torch.optim.Adam(params, lr=lr, eps=EPSILON)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        adam, lambda step: cosine_factor(step, decay_steps, alpha)
    )
    return adam, schedule


def steps_per_epoch(samples: int, batch_size: int) -> int:
    return max(1, -(-int(samples) // int(batch_size)))


def _step(model, adam, schedule, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    adam.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(x).squeeze(-1), y)
    loss.backward()
    adam.step()
    schedule.step()
    return loss.detach()


def train_epoch(
    model: nn.Module,
    adam: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    context: Context,
    stream: ChunkStream,
    epoch: int,
) -> tuple[float, int]:
    """One epoch over the stream through `context.timed_batches` (which measures the data
    stall). Returns (mean training MSE, samples)."""
    device = torch.device(context.device)
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    samples = 0
    for x, y in context.timed_batches(stream, epoch):
        xt = torch.from_numpy(x).to(device, non_blocking=True)
        yt = torch.from_numpy(y).to(device, non_blocking=True)
        total += _step(model, adam, schedule, xt, yt).double() * len(y)
        samples += len(y)
    return float(total) / max(samples, 1), samples


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: str | torch.device = "cpu") -> float:
    """Mean squared error over (X, y) numpy batches (normalised units)."""
    device = torch.device(device)
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for x, y in batches:
        xt = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device)
        yt = torch.from_numpy(np.ascontiguousarray(y, np.float32)).to(device)
        total += ((model(xt).squeeze(-1) - yt) ** 2).sum(dtype=torch.float64)
        n += len(y)
    return float(total) / max(n, 1)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
    """Normalised predictions, 1-D float32, computed in batches of `EVAL_BATCH`."""
    device = torch.device(device)
    model.eval()
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(len(x), np.float32)
    for start in range(0, len(x), EVAL_BATCH):
        xt = torch.from_numpy(x[start : start + EVAL_BATCH]).to(device)
        out[start : start + len(xt)] = model(xt).squeeze(-1).cpu().numpy()
    return out


def array_batches(x: np.ndarray, y: np.ndarray, batch_size: int = EVAL_BATCH):
    for start in range(0, len(y), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def fit_stream(
    model: nn.Module,
    context: Context,
    train: ChunkStream,
    val: ChunkStream | None,
    *,
    epochs: int,
    lr: float,
    alpha: float = 0.0,
    first_epoch: int = 0,
    of: int | None = None,
) -> None:
    """Train on a stream for `epochs` epochs (Adam, cosine decay over all of them), logging
    training and validation MSE per epoch."""
    decay = epochs * steps_per_epoch(context.task.samples[train.part], train.batch_size)
    adam, schedule = optimizer(model, lr, decay, alpha)
    for epoch in range(epochs):
        start = time.perf_counter()
        loss, samples = train_epoch(model, adam, schedule, context, train, epoch)
        seconds = time.perf_counter() - start
        val_loss = None if val is None else evaluate(model, val.batches(0), context.device)
        context.log_epoch(
            first_epoch + epoch,
            loss,
            val_loss,
            seconds=seconds,
            samples=samples,
            of=of or epochs,
            lr=schedule.get_last_lr()[0],
        )


def fit_arrays(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    val: tuple[np.ndarray, np.ndarray] | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    alpha: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[EpochLoss]:
    """Train on in-memory arrays (a small labelled set: fine-tuning), reshuffled every epoch
    by a seeded generator; Adam with a cosine decay over all the steps. Returns the losses of
    every epoch (the caller logs them)."""
    device = torch.device(device)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device)
    yt = torch.from_numpy(np.ascontiguousarray(y, np.float32)).to(device)
    adam, schedule = optimizer(model, lr, epochs * steps_per_epoch(len(y), batch_size), alpha)
    generator = torch.Generator().manual_seed(int(seed))
    history = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(yt), generator=generator).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, len(yt), batch_size):
            idx = order[i : i + batch_size]
            total += _step(model, adam, schedule, xt[idx], yt[idx]).double() * len(idx)
        seconds = time.perf_counter() - start
        val_loss = None if val is None else evaluate(model, array_batches(*val), device)
        history.append(EpochLoss(float(total) / max(len(yt), 1), val_loss, seconds, len(yt)))
    return history
