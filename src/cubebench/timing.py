"""Clocks of a case's run: its phases, its training loop, and the compute time of one step.

Every library's stall has one definition (`stall_estimate`): the training loop's wall time
minus the time the same number of steps take on **resident batches** (batches already in
memory, so the loader is out of the way), over the fit time. The resident step time comes
from an `InterleavedProbe`: short bursts of steps on resident batches, run between the
training steps every so often (the model put back after each burst), so that they see the
same stretch of a shared, drifting machine as the steps they stand for, and the same
decode threads running beside them. Their spread gives the estimate's 95 % interval. Where
the wait for a batch can also be timed directly (loops of ours: torch, scikit-learn),
`LoopClock` times it too, which validates the estimate; inside Keras' `fit` only the
estimate exists.

Under DDP every rank bursts at the same steps with the same length (the burst's steps are
collective): the one decision they share goes through `cubebench.ranks.gather`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cubebench import ranks

BURST_SECONDS = 0.05  # a burst of resident steps lasts at least about this long ...
PROBE_SHARE = 0.15  # ... and comes every block / PROBE_SHARE steps: the probe adds ~15 %
MIN_BURSTS = 10  # the interval needs some degrees of freedom: more bursts on short loops
MAX_BURST_STEPS = 1000


class PhaseClock:
    """Seconds spent in named phases (`warmup`, `probe`) of a case's `fit`, so that the
    worker can book them apart from the training epochs. A phase inside another is the outer
    one's (a stream opened for the probe is probe time, counted once)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._active: str | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._active is not None:
            yield
            return
        self._active = name
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self._active = None

    @property
    def active(self) -> str | None:
        """The phase running now, or None during training."""
        return self._active

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)

    def since(self, snapshot: dict[str, float], name: str) -> float:
        """Seconds booked as `name` since `snapshot`."""
        return self.seconds.get(name, 0.0) - snapshot.get(name, 0.0)


@dataclass
class LoopClock:
    """The training loop as the stall sees it: wall seconds of its passes over the training
    streams (validation excluded), the steps they took, and the measured wait inside
    `next(batch)` where the loop is ours (`wait_observable`)."""

    seconds: float = 0.0
    steps: int = 0
    wait_seconds: float = 0.0
    wait_observable: bool = False

    def record(self, seconds: float, steps: int) -> None:
        """A pass timed by the framework's own loop (Keras `fit`)."""
        self.seconds += seconds
        self.steps += int(steps)


@dataclass(frozen=True)
class StepTiming:
    """Seconds of one training step on resident batches: the mean over `blocks` bursts of
    `block` steps each, and the half width of its 95 % interval (Student t over bursts)."""

    mean: float
    ci95: float
    block: int
    blocks: int

    @property
    def steps(self) -> int:
        return self.block * self.blocks


def t_quantile(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def summarize_bursts(per_step: Sequence[float], block: int) -> StepTiming:
    """The mean seconds per step over bursts, with its Student t interval."""
    n = len(per_step)
    mean = sum(per_step) / n
    if n < 2:
        return StepTiming(mean, math.inf, block, n)
    sd = math.sqrt(sum((s - mean) ** 2 for s in per_step) / (n - 1))
    return StepTiming(mean, t_quantile(n - 1) * sd / math.sqrt(n), block, n)


@dataclass
class InterleavedProbe:
    """Bursts of `step` on `resident` batches between training steps.

    `before_step()` is called before every training step; every `every`-th call (the first
    included) runs a burst of `block` steps inside `preserved()` (which puts the model back)
    and returns the seconds it took, which the loop's clock leaves out. The first burst
    calibrates `block` (about BURST_SECONDS of steps) and `every` (block / PROBE_SHARE steps,
    fewer when that leaves less than MIN_BURSTS over `planned_steps`), agreed by every rank.
    `finish()` adds bursts up to MIN_BURSTS when the loop was shorter than planned and
    returns the step timing.
    """

    step: Callable[[Any], Any]
    resident: Sequence[Any]
    preserved: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    sync: Callable[[], None] = lambda: None
    planned_steps: int = 1
    every: int = 0  # 0: not calibrated yet
    block: int = 1
    per_step: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time of every burst, preserving and restoring included
    calls: int = 0
    _next: int = 0  # the next resident batch

    def before_step(self) -> float:
        due = self.calls == 0 or (self.every > 0 and self.calls % self.every == 0)
        self.calls += 1
        return self._burst() if due else 0.0

    def _burst(self) -> float:
        start = time.perf_counter()
        with self.preserved():
            if not self.every:
                self._calibrate()
            self.sync()
            begun = time.perf_counter()
            for _ in range(self.block):
                self.step(self.resident[self._next % len(self.resident)])
                self._next += 1
            self.sync()
            self.per_step.append((time.perf_counter() - begun) / self.block)
        spent = time.perf_counter() - start
        self.seconds += spent
        return spent

    def _calibrate(self) -> None:
        self.step(self.resident[0])  # untimed: caches, a first call on this shape
        self.sync()
        start = time.perf_counter()
        for k in range(2):
            self.step(self.resident[k % len(self.resident)])
        self.sync()
        estimate = max((time.perf_counter() - start) / 2, 1e-9)
        block = max(1, min(MAX_BURST_STEPS, math.ceil(BURST_SECONDS / estimate)))
        every = max(1, min(round(block / PROBE_SHARE), self.planned_steps // MIN_BURSTS))
        agreed = ranks.gather((block, every))  # collective steps: one schedule for all ranks
        self.block = max(b for b, _ in agreed)
        self.every = max(e for _, e in agreed)

    def finish(self) -> StepTiming:
        while len(self.per_step) < MIN_BURSTS:
            self._burst()
        return summarize_bursts(self.per_step, self.block)


@dataclass(frozen=True)
class Stall:
    """The stall of one training loop, in seconds, with the half width of its 95 % interval."""

    seconds: float
    ci95: float


def stall_estimate(loop: LoopClock, compute: StepTiming) -> Stall:
    """Loop time - steps x resident step time. Not clamped: a negative value within its
    interval says the loader cost nothing measurable."""
    return Stall(loop.seconds - loop.steps * compute.mean, loop.steps * compute.ci95)
