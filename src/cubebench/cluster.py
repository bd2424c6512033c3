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
MALLOC_TRIM_KEY = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


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
def dask_client(scheduler: str | None, malloc_trim: bool = True) -> Iterator[Client | None]:
    """A distributed Client for `scheduler` (None: no client, dask's default threads).

    distributed starts LocalCluster workers with MALLOC_TRIM_THRESHOLD_=65536, so that
    long-lived workers hand freed memory back to the system. Setting it also turns off glibc's
    dynamic mmap threshold: every temporary above 64 KiB is then mapped and page-faulted
    afresh. `malloc_trim=False` keeps glibc's defaults: generating `medium` on local:2 then
    spends 2 s of system time instead of 22 s, and half the wall time. (Workers of a running
    scheduler keep what their nanny gave them.)
    """
    if scheduler is None:
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    workers = parse_local(scheduler)
    if workers is not None:
        malloc = {} if malloc_trim else {MALLOC_TRIM_KEY: None}  # read when workers spawn
        with (
            dask.config.set(malloc),
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                # its HTTP routes (health, metrics) start anyway: on a free port, not on 8787
                # with a warning when another cluster holds it
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                host="127.0.0.1",
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        _ask_identity(scheduler, CONNECT_TIMEOUT_S)
        client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CubebenchError(
            f"cannot reach the dask scheduler at {scheduler!r}: {reason}"
        ) from None
    with client:
        yield client


def _ask_identity(address: str, timeout: float) -> None:
    """Raise unless a dask scheduler at `address` says who it is within `timeout` seconds.

    distributed's own connect waits without limit for the handshake of a server that accepts
    the connection and never answers (an HTTP port, such as a dashboard's), and a server that
    answers something else can make it try to allocate exabytes: ask first, with a deadline.
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.core import rpc

    async def identity() -> dict:
        remote = rpc(address, timeout=timeout)
        try:
            return await remote.identity()
        finally:
            await remote.close_rpc()

    def ask() -> dict:
        deadline = timeout + 2  # connecting gives up after `timeout` and says why
        try:
            return asyncio.run(asyncio.wait_for(identity(), deadline))
        except TimeoutError:
            raise TimeoutError(f"connected, but no dask answer within {deadline:g} s") from None
        except (OSError, ValueError):  # refused, unknown host, bad scheme: their own words
            raise
        except Exception as exc:  # an answer that is not a dask message
            raise ValueError(f"not a dask scheduler ({type(exc).__name__})") from None

    with ThreadPoolExecutor(1) as pool:  # its own event loop, even under a running one
        info = pool.submit(ask).result()
    kind = info.get("type") if isinstance(info, dict) else None
    if kind != "Scheduler":
        raise ValueError(f"not a dask scheduler (it says it is a {kind or 'something else'})")
