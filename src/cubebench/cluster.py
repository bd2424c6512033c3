"""Where dask work runs: `--dask-scheduler` for preparation, generation and rechunking.

None: dask's threads in this process. `local` or `local:N`: a LocalCluster of N single-threaded
worker processes (default: one per core), started and stopped around the work. Anything else
is the address of a running `dask scheduler` (e.g. `tcp://10.0.0.5:8786`) whose `dask worker`s
must see the same paths as this process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from cubebench.errors import CubebenchError

if TYPE_CHECKING:
    from distributed import Client

CONNECT_TIMEOUT_S = 20


def parse_local(scheduler: str) -> int | None:
    """Workers of a `local[:N]` scheduler; None when `scheduler` is an address."""
    if scheduler == "local":
        return os.cpu_count() or 1
    if not scheduler.startswith("local:"):
        return None
    try:
        workers = int(scheduler.removeprefix("local:"))
    except ValueError:
        workers = 0
    if workers < 1:
        raise CubebenchError(f"--dask-scheduler local:N needs N >= 1, got {scheduler!r}")
    return workers


@contextlib.contextmanager
def dask_client(scheduler: str | None) -> Iterator[Client | None]:
    """A distributed Client for `scheduler` (None: no client, dask's default threads)."""
    if scheduler is None:
        yield None
        return
    from distributed import Client, LocalCluster

    workers = parse_local(scheduler)
    if workers is not None:
        with (
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                host="127.0.0.1",
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CubebenchError(
            f"cannot reach the dask scheduler at {scheduler!r}: {reason}"
        ) from None
    with client:
        yield client
