"""Exclusive file locks on what concurrent suites share (a run dir, the cube cache, a sqlite
mlflow store). `flock` locks go with their holder: the kernel drops them when it dies, SIGKILL
included, so a crashed suite never leaves a stale lock behind."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from cubebench.errors import CubebenchError


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[int]:
    """Hold an exclusive lock on `path` (created, with its directory, when missing) and yield
    its descriptor. With `wait=False`, BlockingIOError at once if another process holds it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise CubebenchError(f"cannot lock {path}: {error.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield fd
    finally:
        os.close(fd)
