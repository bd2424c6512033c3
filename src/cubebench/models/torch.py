"""The PyTorch half of the fairness twins: the MLP and the U-Net, their optimiser and their
training loops.

`cubebench.models.keras` builds the same models: the same layers and widths, activation,
Glorot-uniform weights and zero biases (set explicitly: torch's default init differs), Adam
with the same learning rate and cosine schedule, the same batch size, epochs and loss (MSE;
on windows, the MSE over the pixels to fill).

The loops take pixel batches `(x[B, F], y[B])` and window batches `(x[B, C, h, w],
y[B, t, h, w], mask[B, t, h, w])` alike; on windows the logged losses are the MSE over all
the masked pixels of the epoch (not a mean of per-batch means), as Keras' `MaskedMSE` metric.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from cubebench import ranks
from cubebench.case import Context
from cubebench.gpu import CopyClock
from cubebench.loading import Stream
from cubebench.loading.torch import PREFETCH
from cubebench.loading.torch import to_device as batches_to_device
from cubebench.models import EpochLoss

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "gelu": nn.GELU}
EPSILON = 1e-7  # Adam's epsilon: Keras' default, set in both frameworks
EVAL_BATCH = 65536  # pixels per forward pass in evaluation and prediction


def seed_and_threads(seed: int, threads: int) -> None:
    """Seed torch's generators and use `threads` CPU threads."""
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, int(threads)))


def on_device(device: str) -> contextlib.AbstractContextManager:
    """Where models are built and run: torch places them itself (`to_device`)."""
    return contextlib.nullcontext()


def to_device(model: nn.Module, device: str) -> nn.Module:
    return model.to(device)


def copy_model(model: nn.Module) -> nn.Module:
    """An independent copy with the same weights."""
    return copy.deepcopy(model)


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


class UNet(nn.Module):
    """A U-Net of `len(widths)` levels: per level two 3x3 convolutions + ReLU, then 2x2 max
    pooling; a bottleneck of width `2 * widths[-1]`; back up by nearest x2 upsampling and
    concatenation of the level's features (upsampled first, skip second), two convolutions;
    a 1x1 convolution to `out_channels`. Inputs whose height or width is not a multiple of
    `2 ** len(widths)` are zero-padded at the bottom and right, the output cropped back."""

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int]):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be positive, got {widths!r}")
        self.factor = 2 ** len(widths)
        self.down = nn.ModuleList()
        width = int(in_channels)
        for w in widths:
            self.down.append(_double_conv(width, w))
            width = w
        self.bottleneck = _double_conv(width, 2 * widths[-1])
        width = 2 * widths[-1]
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(_double_conv(width + w, w))
            width = w
        self.head = nn.Conv2d(width, int(out_channels), 1)
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")

    def convolutions(self) -> list[nn.Conv2d]:
        """Every convolution in the order of `cubebench.models.keras.unet_convolutions`."""
        return [m for m in self.modules() if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.factor, (-w) % self.factor
        if pad_h or pad_w:
            x = nn.functional.pad(x, (0, pad_w, 0, pad_h))
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(torch.cat([self.upsample(x), skip], dim=1))
        return self.head(x)[..., :h, :w]


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.ReLU(),
    )


def build_unet(
    in_channels: int,
    out_channels: int,
    window: tuple[int, int] | None = None,
    widths: Sequence[int] = (16, 32),
    seed: int | None = None,
) -> UNet:
    """The U-Net (`UNet`): `[B, in_channels, h, w]` in, `[B, out_channels, h, w]` out, for
    windows of any size (`window`, which Keras' graph needs, is not needed here);
    Glorot-uniform weights and zero biases, from a generator of `seed` if one is given."""
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    model = UNet(in_channels, out_channels, widths)
    with torch.no_grad():
        for conv in model.convolutions():
            nn.init.xavier_uniform_(conv.weight, generator=generator)
            nn.init.zeros_(conv.bias)
    return model


def masked_mse(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The MSE over the masked pixels (the pixels to fill): sum(mask (pred - y)^2) / sum(mask),
    0 for a batch without any. Keeps to the device (no host sync)."""
    return (mask * (pred - y) ** 2).sum() / torch.clamp_min(mask.sum(), 1.0)


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


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None):
    """MSE of a pixel batch, masked MSE of a window batch. An empty batch (a DDP rank whose
    share ran short) gives a zero loss that still takes part in the gradients' all-reduce."""
    pred = model(x)
    if mask is not None:
        return masked_mse(pred, y, mask)
    pred = pred.squeeze(-1)
    return nn.functional.mse_loss(pred, y) if len(y) else pred.sum() * 0.0


class Trainer:
    """The training step of every torch case, and what the suite's clocks need around it.

    One `step` runs in the training loop, in the warm-up and in the compute probe (the same
    code, so the probe times what the loop did); `preserved()` puts the model, the optimiser
    and the schedule back as they were after a warm-up or a probe. Losses are accumulated on
    the device (no host sync per step): the MSE over the epoch's samples, or over the masked
    pixels of windows.

    The loops hand `step` tensors already on the device (`cubebench.loading.torch.to_device`,
    which prefetches them on CUDA), and the probe's resident batches are put there by the
    same function, so the probe times the step without a host-to-device copy, as the loop
    runs it. The copy is the data path's: overlapped on CUDA, and what it fails to hide (the
    staging, a copy the GPU has to wait for) lands in the loop's time, hence in the stall.
    A numpy batch is still accepted (copied here, synchronously) for callers outside the
    loops.
    """

    def __init__(self, model: nn.Module, device: str, lr: float, decay_steps: int, alpha: float):
        self.model = model  # the DDP wrapper under DDP
        self.device = torch.device(device)
        self.adam, self.schedule = optimizer(model, lr, decay_steps, alpha)
        self.reset()

    def reset(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64, device=self.device)
        self.weight = torch.zeros((), dtype=torch.float64, device=self.device)
        self.samples = 0

    def step(self, batch: Sequence[torch.Tensor | np.ndarray]) -> None:
        xt, yt, *mask = (torch.as_tensor(a, device=self.device) for a in batch)
        mt = mask[0] if mask else None
        self.adam.zero_grad(set_to_none=True)
        loss = _loss(self.model, xt, yt, mt)
        loss.backward()
        self.adam.step()
        self.schedule.step()
        weight = mt.sum(dtype=torch.float64) if mt is not None else float(len(yt))
        self.total += loss.detach().double() * weight
        self.weight += weight
        self.samples += len(yt)

    def batches(
        self,
        batches: Iterable[Sequence[np.ndarray]],
        prefetch: int = PREFETCH,
        clock: CopyClock | None = None,
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Numpy batches as tensors on the trainer's device, `prefetch` ahead on CUDA; the
        copies timed into `clock` (the training loops pass `Context.copies`)."""
        return batches_to_device(batches, self.device, prefetch, clock)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def preserved(self):
        """Whatever steps run inside leave model, optimiser, schedule and sums as they were."""
        inner = self.model.module if hasattr(self.model, "module") else self.model
        saved = copy.deepcopy(
            (inner.state_dict(), self.adam.state_dict(), self.schedule.state_dict())
        )
        sums = (self.total.clone(), self.weight.clone(), self.samples)
        try:
            yield
        finally:
            self.sync()
            inner.load_state_dict(saved[0])
            self.adam.load_state_dict(saved[1])
            self.schedule.load_state_dict(saved[2])
            self.total, self.weight, self.samples = sums

    @property
    def lr(self) -> float:
        return float(self.schedule.get_last_lr()[0])


def train_epoch(
    trainer: Trainer, context: Context, stream: Stream, epoch: int, prefetch: int = PREFETCH
) -> tuple[float, int]:
    """One epoch over the stream through `context.timed_batches` (which times the loop and the
    wait for data: here the wait for the next batch on the device, `prefetch` copied ahead on
    CUDA, the copies timed into `context.copies`). Returns (mean training MSE, samples) over
    all ranks; on windows the MSE of the masked pixels and the samples are windows. Under DDP
    every rank takes the same number of steps (the stream deals the samples so), or this
    fails: one schedule needs it."""
    trainer.model.train()
    trainer.reset()
    steps = 0
    ready = context.timed_batches(
        stream, epoch, prepare=lambda b: trainer.batches(b, prefetch, context.copies)
    )
    for batch in ready:
        trainer.step(batch)
        steps += 1
    taken = ranks.gather(steps)
    if len(set(taken)) > 1:
        raise RuntimeError(f"epoch {epoch}: the ranks took {taken} steps; DDP needs equal steps")
    total, weight, samples = ranks.total(
        float(trainer.total), float(trainer.weight), trainer.samples
    )
    return total / max(weight, 1.0), int(samples)


def distribute(model: nn.Module, device: str) -> nn.Module:
    """The model wrapped in `DistributedDataParallel` inside a multi-rank run (gradients
    averaged across ranks every step), else the model itself."""
    if not ranks.is_distributed():
        return model
    ids = [torch.cuda.current_device()] if device == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Sequence[np.ndarray]],
    device: str | torch.device = "cpu",
    prefetch: int = PREFETCH,
) -> float:
    """Mean squared error over (X, y) numpy batches (normalised units); over the masked
    pixels of (x, y, mask) window batches. Under DDP, over every rank's batches. The batches
    reach the device through `to_device` (`prefetch` ahead on CUDA), as in training."""
    device = torch.device(device)
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n: int | torch.Tensor = 0
    as_float = (tuple(np.ascontiguousarray(a, np.float32) for a in batch) for batch in batches)
    for xt, yt, *mask in batches_to_device(as_float, device, prefetch):
        if mask:
            mt = mask[0]
            total += (mt * (model(xt) - yt) ** 2).sum(dtype=torch.float64)
            n = n + mt.sum(dtype=torch.float64)
        else:
            total += ((model(xt).squeeze(-1) - yt) ** 2).sum(dtype=torch.float64)
            n += len(yt)
    total_sum, n_sum = ranks.total(float(total), float(n))
    return total_sum / max(n_sum, 1.0)


def eval_batch(x: np.ndarray) -> int:
    """Rows per forward pass: `EVAL_BATCH` pixels, as whole windows for window inputs."""
    return EVAL_BATCH if x.ndim == 2 else max(1, EVAL_BATCH // int(np.prod(x.shape[2:])))


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
    """Normalised predictions, float32, in batches of `EVAL_BATCH` pixels: 1-D for pixels
    `x[B, F]`, `[B, t, h, w]` for windows `x[B, C, h, w]`."""
    device = torch.device(device)
    model.eval()
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2:
        step = eval_batch(x)
        starts = range(0, max(len(x), 1), step)  # an empty batch still gives the output's shape
        parts = [model(torch.from_numpy(x[i : i + step]).to(device)).cpu().numpy() for i in starts]
        return np.concatenate(parts)
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
    train: Stream,
    val: Stream | None,
    *,
    epochs: int,
    lr: float,
    alpha: float = 0.0,
    first_epoch: int = 0,
    of: int | None = None,
) -> None:
    """Train on a stream for `epochs` epochs (Adam, cosine decay over every step of them),
    logging training and validation MSE per epoch. Pixels or windows: the steps follow the
    part's samples (windows for a patch task).

    As for every library: a warm-up step before the epochs (first-call costs: allocations,
    kernels, a CUDA context), and bursts of the same step between training steps (the
    compute probe of the stall), both on resident batches with the model put back; the
    warm-up is booked as `warmup_s`, the probe apart, neither in the epochs' time.

    Under DDP (`cubebench run --nproc N`) the streams are this rank's share, every rank takes
    the same steps per epoch (`stream.steps_per_epoch()`: ceil(part samples / (N x batch))),
    so the learning rate follows one global step count; each step's gradients are averaged
    over the ranks (a global batch of N x batch_size, the learning rate unscaled), and the
    logged losses and samples cover every rank."""
    steps = train.steps_per_epoch()
    with context.phase("warmup"):  # building Adam imports torch._dynamo: ~2 s, once
        trainer = Trainer(
            distribute(model, context.device), context.device, lr, epochs * steps, alpha
        )
    with context.phase("probe"):  # on the device, as the loop's batches (`Trainer`)
        resident = list(trainer.batches(context.resident_batches(train)))
    with context.phase("warmup"), trainer.preserved():
        trainer.model.train()
        trainer.step(resident[0])
    probing = context.probing(
        trainer.step,
        resident,
        planned_steps=epochs * steps,
        preserved=trainer.preserved,
        sync=trainer.sync,
    )
    with probing:
        for epoch in range(epochs):
            start, booked = time.perf_counter(), context.clock.snapshot()
            loss, samples = train_epoch(trainer, context, train, epoch)
            seconds = time.perf_counter() - start - context.clock.since(booked, "probe")
            val_loss = None if val is None else evaluate(model, val.batches(0), context.device)
            context.log_epoch(
                first_epoch + epoch,
                loss,
                val_loss,
                seconds=seconds,
                samples=samples,
                of=of or epochs,
                lr=trainer.lr,
                steps=float(steps),
            )


def fit_arrays(
    model: nn.Module,
    context: Context,
    x: np.ndarray,
    y: np.ndarray,
    val: tuple[np.ndarray, np.ndarray] | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    alpha: float = 0.0,
    seed: int = 0,
) -> list[EpochLoss]:
    """Train on in-memory arrays (a small labelled set: fine-tuning), reshuffled every epoch
    by a seeded generator; Adam with a cosine decay over all the steps; a warm-up step first
    (booked as warm-up). The epochs' copies to the device are timed into `context.copies`
    (training batches, as in `train_epoch`). Returns the losses of every epoch (the caller
    logs them)."""
    x = np.ascontiguousarray(x, np.float32)
    y = np.ascontiguousarray(y, np.float32)
    decay = epochs * steps_per_epoch(len(y), batch_size)
    with context.phase("warmup"):
        trainer = Trainer(model, context.device, lr, decay, alpha)
    with context.phase("warmup"), trainer.preserved():
        model.train()
        for batch in trainer.batches([(x[:batch_size], y[:batch_size])]):
            trainer.step(batch)
    generator = torch.Generator().manual_seed(int(seed))
    history = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        trainer.reset()
        order = torch.randperm(len(y), generator=generator).numpy()
        shuffled = (
            (x[order[i : i + batch_size]], y[order[i : i + batch_size]])
            for i in range(0, len(y), batch_size)
        )
        for batch in trainer.batches(shuffled, clock=context.copies):
            trainer.step(batch)
        seconds = time.perf_counter() - start
        val_loss = None if val is None else evaluate(model, array_batches(*val), context.device)
        loss = float(trainer.total) / max(float(trainer.weight), 1.0)
        history.append(EpochLoss(loss, val_loss, seconds, len(y)))
    return history
