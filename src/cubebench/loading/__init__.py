"""Chunk-aligned streaming of prepared tasks, with data-loading cost accounting.

Framework adapters live in `cubebench.loading.torch` and `cubebench.loading.tf` and import their
framework; this package itself imports none.
"""

from cubebench.loading.patches import PatchStream
from cubebench.loading.readers import available_readers, open_reader
from cubebench.loading.stream import ChunkStream, LoadStats, materialize
from cubebench.task import PreparedTask

Stream = ChunkStream | PatchStream


def open_stream(task: PreparedTask, part: str = "train", **options) -> Stream:
    """The stream of the task's sample geometry: pixels (`ChunkStream`) or windows
    (`PatchStream`); both take the same options."""
    cls = PatchStream if task.spec.patch is not None else ChunkStream
    return cls(task, part, **options)


__all__ = [
    "ChunkStream",
    "LoadStats",
    "PatchStream",
    "Stream",
    "available_readers",
    "materialize",
    "open_reader",
    "open_stream",
]
