"""Ctrl-C and SIGTERM that are never lost.

A command started in the background by a non-interactive shell (`cmd &` in a script, a CI
harness) inherits SIGINT *ignored*, and Python then leaves it ignored: Ctrl-C or `kill -INT`
did nothing, a suite went on waiting for its case, a rechunk completed and exited 0 (the two
"races" a busy CI machine showed). `install` sets the handlers whatever the command inherited.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to be.
When that is a finalizer (`__del__`, a weakref callback: garbage collection runs them at any
allocation) or library code that catches everything, the exception is printed as "ignored" or
swallowed, and the program goes on: a suite keeps waiting for its case, a rechunk completes and
exits 0. Here a signal also sets a latch that outlives the exception: long waits look at it
every fraction of a second (`wait`), and a command looks at it before every step that commits
something (`check`), so an interrupt that was swallowed once is raised again at the next one.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

SLICE_S = 0.2  # how often a wait looks at the latch

_latch = threading.Event()


def _on_signal(signum: int, frame: object) -> None:
    _latch.set()
    raise KeyboardInterrupt


def install() -> None:
    """Ctrl-C and SIGTERM (`docker stop`, a batch system) both interrupt, and are latched,
    also where the process inherited them ignored. The main thread only (where Python runs
    signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _on_signal)


def interrupted() -> bool:
    return _latch.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if a signal came, even one whose exception was swallowed."""
    if _latch.is_set():
        raise KeyboardInterrupt


def wait(proc: subprocess.Popen, timeout: float | None = None) -> int:
    """`proc.wait(timeout)`, looking at the latch every SLICE_S: raises KeyboardInterrupt when
    interrupted, subprocess.TimeoutExpired past `timeout`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        check()
        step = SLICE_S if deadline is None else min(SLICE_S, max(0.0, deadline - time.monotonic()))
        try:
            return proc.wait(timeout=step)
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() >= deadline:
                raise


def reset() -> None:
    """Forget a latched interrupt (tests that run several commands in one process)."""
    _latch.clear()
