"""Chunk-aligned streaming of prepared tasks, with data-loading cost accounting.

Framework adapters live in `cubebench.loading.torch` and `cubebench.loading.tf` and import their
framework; this package itself imports none.
"""

from cubebench.loading.readers import available_readers, open_reader
from cubebench.loading.stream import ChunkStream, LoadStats, materialize

__all__ = ["ChunkStream", "LoadStats", "available_readers", "materialize", "open_reader"]
