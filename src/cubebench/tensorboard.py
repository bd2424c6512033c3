"""TensorBoard event files of scalars, written with the `tensorboard` package's own writer.

`torch.utils.tensorboard` and `tf.summary` would do the same, but the first imports TensorFlow
when it is installed (8 s here) and the second needs it: a torch or scikit-learn case must not
pay for TensorFlow. `tensorboard.summary.writer` writes the same event files with neither, once
told to use its TensorFlow stub (`_without_tensorflow`).
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path


def _without_tensorflow() -> None:
    """tensorboard resolves `tf` lazily to TensorFlow when it is installed, unless the marker
    module `tensorboard.compat.notf` exists (what the `tensorboard-notf` builds ship); then it
    uses its own stub, which writes local (and S3) files. Keep TensorFlow out of processes that
    have not loaded it already."""
    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("notf"))


class ScalarWriter:
    """Scalars per step into `logdir` (one event file per writer)."""

    def __init__(self, logdir: str | Path):
        _without_tensorflow()
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        Path(logdir).mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(logdir))

    def add_scalars(self, step: int, values: dict[str, float | None]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                for tag, value in values.items()
                if value is not None
            ]
        )
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        self._writer.close()  # flushes


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every event file in `logdir` (TensorBoard's own reader)."""
    _without_tensorflow()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }
