"""The case contract: what a file in `cases/` declares and implements.

A case is one library's way to solve a task (benchopt's solvers are the model). The runner
owns everything that must be measured the same way for every case: the cube and the task,
the streams (and their loading costs), timing, evaluation on the test part in physical units,
and the result file. A case only builds its model, trains it on the streams it is handed and
predicts a batch. Add a case by copying a file in `cases/` and changing the model.

Frameworks are imported inside the case's methods (or in `cubebench.models.*`), never at the
top of a case file: listing the cases must not load TensorFlow.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from cubebench import ranks
from cubebench.gpu import CopyClock
from cubebench.loading import Stream, open_stream
from cubebench.loading.stream import LoadStats, materialize
from cubebench.task import PreparedTask
from cubebench.tensorboard import ScalarWriter
from cubebench.timing import InterleavedProbe, LoopClock, PhaseClock, StepTiming

RESIDENT_BATCHES = 4  # distinct batches the compute probe cycles over

Predict = Callable[[np.ndarray], np.ndarray]  # normalised X[B, F] -> normalised y_hat[B]


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float | None
    val_loss: float | None
    seconds: float
    samples: int
    extra: dict[str, float] = field(default_factory=dict)


class Context:
    """What the runner hands a case: the prepared task, parameters, device, seed and threads,
    streams whose loading costs are collected, a log for per-epoch losses, and the clocks
    that measure every library the same way:

    - `phase("warmup")` / `phase("probe")` inside `fit`: compile, tracing and first steps are
      booked as warm-up, measurements as probe; the rest of `fit` is the training epochs;
    - `timed_batches` times the loop over a training stream (wall time, steps, and the wait
      inside `next(batch)`); framework loops report theirs with `loop.record`;
    - `probing(step, resident)` interleaves bursts of the same step on resident batches with
      the training steps, for the stall (`before_step` in framework loops);
    - `copies` times the training batches' host-to-device copies on the device, where the
      loop makes them (torch on CUDA: `cubebench.loading.torch.to_device`).

    In a DDP run (`run --nproc N`, torch cases with `distributed = True`) every rank has its
    own context, and `stream` gives the rank its share of the part's samples."""

    def __init__(
        self,
        task: PreparedTask,
        params: dict[str, Any],
        *,
        device: str = "cpu",
        seed: int = 0,
        threads: int = 2,
        tensorboard_dir: str | None = None,
        on_epoch: Callable[[EpochRecord, int], None] | None = None,
    ):
        self.task = task
        self.params = params
        self.device = device
        self.seed = seed
        self.threads = threads
        self.rank, self.world_size = ranks.rank(), ranks.world_size()
        self.tensorboard_dir = tensorboard_dir
        self.epochs: list[EpochRecord] = []
        self.train_streams: list[Stream] = []
        self.clock = PhaseClock()
        self.loop = LoopClock()
        self.compute: StepTiming | None = None  # resident step time (`probing`)
        self._probe: InterleavedProbe | None = None
        self.copies = CopyClock()  # the training batches' copies to the GPU
        self.train_samples: int | None = None  # set by cases that log no epochs (in-memory)
        self._on_epoch = on_epoch
        self._tensorboard: ScalarWriter | None = None

    @property
    def batch_size(self) -> int:
        return int(self.params.get("batch_size", 4096))

    def phase(self, name: str):
        """Book the time inside this block as `name` (`warmup` or `probe`), not as training."""
        return self.clock.phase(name)

    def stream(
        self, part: str = "train", *, shuffle: bool = True, counted: bool | None = None, **options
    ) -> Stream:
        """A stream over a part, seeded by the run. Pixels (`ChunkStream`) or windows
        (`PatchStream`), by the task's geometry; under DDP this rank's disjoint share (the same
        seed on every rank: one permutation, dealt out by samples, every rank the same number
        of batches). Training streams (`shuffle`, unless `counted=False`) count as loading
        cost."""
        options.setdefault("batch_size", self.batch_size)
        options.setdefault("threads", self.threads)
        with self.phase("warmup"):  # opening a store, loading the kernels: not training
            stream = open_stream(self.task, part, shuffle=shuffle, seed=self.seed, **options)
        if self.world_size > 1:
            stream.shard(self.rank, self.world_size)
        if shuffle if counted is None else counted:
            self.train_streams.append(stream)
        return stream

    def resident_batches(self, stream: Stream, count: int = RESIDENT_BATCHES) -> list[tuple]:
        """Up to `count` full batches of `stream`'s part, read now by an uncounted stream of
        the same options (this rank's share under DDP) and held in memory: what the compute
        probe steps on, so that the loader is out of the way."""
        probe = self.stream(
            stream.part,
            shuffle=stream.shuffle,
            counted=False,
            batch_size=stream.batch_size,
            threads=stream.threads,
        )
        batches = probe.batches(0)
        kept: list[tuple] = []
        try:
            for batch in batches:
                if len(batch[0]):
                    kept.append(tuple(np.array(a) for a in batch))  # owned, not views
                if len(kept) >= count:
                    break
        finally:
            batches.close()
        if len(kept) > 1 and len(kept[-1][0]) < len(kept[0][0]):
            kept.pop()  # the part's last, partial batch: not a typical step
        return kept

    @contextlib.contextmanager
    def probing(
        self,
        step: Callable[[Any], object],
        resident: list,
        *,
        planned_steps: int,
        preserved: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        sync: Callable[[], None] = lambda: None,
    ) -> Iterator[InterleavedProbe]:
        """While inside, bursts of `step` on the `resident` batches run between training
        steps (`timed_batches`, or `before_step` from a framework's loop), booked as probe
        and left out of the loop's time; on leaving, their timing is kept for the stall.
        `preserved()` must put the model back as it was (state restored, or a copy)."""
        probe = InterleavedProbe(step, resident, preserved, sync, max(1, planned_steps))
        self._probe = probe
        try:
            yield probe
        finally:
            self._probe = None
        with self.phase("probe"):
            self.compute = probe.finish()

    def before_step(self) -> float:
        """A training step is about to start: maybe a probe burst first (booked as probe).
        Returns the seconds it took, for a loop clock to leave out."""
        if self._probe is None:
            return 0.0
        with self.phase("probe"):
            return self._probe.before_step()

    def materialize(self, part: str, max_samples: int | None = None):
        """A seeded in-memory subsample (normalised), for in-memory models."""
        return materialize(self.task, part, max_samples, seed=self.seed, threads=self.threads)

    def timed_batches(
        self,
        stream: Stream,
        epoch: int,
        prepare: Callable[[Iterator[tuple]], Iterator] | None = None,
    ) -> Iterator:
        """The epoch's batches, timing the loop over them: its wall time and steps (for the
        stall estimate) and the time it waits inside `next(batch)` (measured directly).

        `prepare` wraps the stream's batches before they are timed (torch: onto the device,
        prefetched), so that the wait measured is the wait for a batch the step can use."""
        batches = stream.batches(epoch)
        if prepare is not None:
            batches = prepare(batches)
        loop = self.loop
        loop.wait_observable = True
        started = time.perf_counter()
        probed = 0.0
        try:
            while True:
                asked = time.perf_counter()
                batch = next(batches, None)
                loop.wait_seconds += time.perf_counter() - asked
                if batch is None:
                    return
                probed += self.before_step()
                loop.steps += 1
                yield batch
        finally:
            loop.seconds += time.perf_counter() - started - probed
            close = getattr(batches, "close", None)
            if close is not None:  # a loop that stopped early: its pending decodes cancelled now
                close()

    def log_epoch(
        self,
        epoch: int,
        train_loss: float | None,
        val_loss: float | None = None,
        *,
        seconds: float = 0.0,
        samples: int = 0,
        of: int = 0,
        **extra: float,
    ) -> None:
        """Record one epoch's losses (normalised units); `of` = planned epochs, for progress."""
        record = EpochRecord(
            epoch,
            None if train_loss is None else float(train_loss),
            None if val_loss is None else float(val_loss),
            float(seconds),
            int(samples),
            {k: float(v) for k, v in extra.items()},
        )
        self.epochs.append(record)
        self._write_tensorboard(record)
        if self._on_epoch:
            self._on_epoch(record, of)

    def _write_tensorboard(self, record: EpochRecord) -> None:
        """Loss curves, learning rate and samples/s into `tensorboard_dir` (if one is set)."""
        if not self.tensorboard_dir:
            return
        if self._tensorboard is None:
            try:
                self._tensorboard = ScalarWriter(self.tensorboard_dir)
            except ImportError:
                print("warning: tensorboard is not installed: no event files", file=sys.stderr)
                self.tensorboard_dir = None
                return
        extra = dict(record.extra)
        self._tensorboard.add_scalars(
            record.epoch,
            {
                "loss/train": record.train_loss,
                "loss/val": record.val_loss,
                "learning_rate": extra.pop("lr", None),
                "samples_per_s": record.samples / record.seconds if record.seconds else None,
                "epoch_seconds": record.seconds,
                **{f"extra/{name}": value for name, value in extra.items()},
            },
        )

    def close(self) -> None:
        """Flush what the case logged (the worker calls this when the case ends)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def loading(self) -> LoadStats:
        """The summed loading costs of every training stream."""
        total = sum((stream.stats for stream in self.train_streams), LoadStats())
        total.stall_seconds = self.loop.wait_seconds
        return total


class Case:
    """Base class of a case. Subclasses set the class attributes and implement `fit` and
    `predict`; `setup` builds the model (imports the framework)."""

    name: ClassVar[str]
    library: ClassVar[str]  # the distribution name: its version is recorded
    task: ClassVar[str] = "lst-from-t2m"
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    parameters: ClassVar[dict[str, Any]] = {}
    # overrides the tests run the case with on the tiny cube (short epochs, small batches):
    # with them a case's end-to-end test takes seconds and its losses still fall
    test_parameters: ClassVar[dict[str, Any]] = {}
    # the part the runner evaluates on (transfer cases evaluate on the target region)
    eval_part: ClassVar[str] = "test"
    # trains with torch DDP under `cubebench run --nproc N` (its loops reduce across ranks)
    distributed: ClassVar[bool] = False

    @classmethod
    def fits(cls, spec: Any) -> str | None:
        """Why this case cannot solve the task `spec` (a TaskSpec), or None when it can.
        `task` is the case's default; what it solves follows from it: the same sample
        geometry (pixels or windows), and a region (transfer) split exactly when its own task
        has one. Any inputs and target: models size themselves from the task."""
        from cubebench.task import get_task

        own = get_task(cls.task)
        unit = {"pixel": "pixel", "patch": "window"}
        if spec.geometry != own.geometry:
            return f"solves {unit[own.geometry]} tasks, not {unit[spec.geometry]} tasks"
        transfer, wanted = own.split.kind == "region", spec.split.kind == "region"
        if transfer and not wanted:
            return "needs a region (transfer) split: [transfer] source and target boxes"
        if wanted and not transfer:
            return "does not transfer: a region split is for the transfer cases"
        return None

    def __init__(self, context: Context):
        self.context = context
        # the defaults under the overrides; the context (batch size of its streams) sees the same
        context.params = self.params = {**self.parameters, **context.params}

    def setup(self) -> None:
        """Build the model; seeds and threads are already set. Timed as warm-up."""

    def fit(self) -> None:
        """Train. Compile and tracing go inside `self.context.phase("warmup")`, measurements
        inside `phase("probe")`: the rest is the training epochs (`fit_s`)."""
        raise NotImplementedError

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predictors(self) -> dict[str, Predict]:
        """What the runner evaluates; the first is the case's result. Transfer cases add
        their baselines (source-only, scratch) here."""
        return {"model": self.predict}

    def extra_metrics(self, rmse_by_predictor: dict[str, float]) -> dict[str, float]:
        """Case-specific numbers derived from the evaluation (e.g. the transfer gain)."""
        return {}
