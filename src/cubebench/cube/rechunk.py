"""`rechunk_cube`: an ML-friendly copy of a cube with another chunk layout, values untouched.

The copy is made at the Zarr level: every array keeps its stored (encoded) values, dtype, fill
value, codecs, attributes and dimension names, the group keeps its attributes and its Zarr
format; only the chunk shape of the (time, lat, lon) variables changes. Coordinates and other
arrays are copied as they are.

Going from `ts` (long time series per chunk) to `map` (one time step per chunk) is all-to-all:
every output chunk needs a piece of every input chunk, and dask's task-based rechunk then holds
most of a variable in memory. dask.distributed's peer-to-peer rechunk spills the exchanged
pieces to the workers' disks instead, so the rechunk runs on a distributed cluster (a
LocalCluster unless `scheduler` names another), one variable at a time (small ones together).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import dask.array as da
import zarr

from cubebench import interrupts
from cubebench.cluster import dask_client, parse_local
from cubebench.cube.access import _is_remote, open_cube
from cubebench.cube.schema import COORD_ALIASES, DIMS
from cubebench.cube.synthetic import layout_chunks
from cubebench.errors import ChunkReadError, CubeError

if TYPE_CHECKING:
    from distributed import Client

SAMPLE_EVERY_S = 0.1  # worker memory sampling period
BATCH_BYTES = 16 << 20  # variables this small (decoded) are rechunked together
_CANONICAL_DIM = {a: c for c, aliases in COORD_ALIASES.items() for a in aliases} | {
    d: d for d in DIMS
}


@dataclass
class RechunkResult:
    src: str
    dst: Path
    layout: str
    chunks: tuple[int, int, int]  # (time, lat, lon)
    variables: list[str]  # the arrays rechunked; the others were copied as they are
    seconds: float = 0.0
    workers: int = 0
    # sum over the dask workers of their resident memory, sampled (None: workers not local)
    peak_worker_rss_mb: float | None = None
    baseline_worker_rss_mb: float | None = None
    decoded_mb: float = 0.0  # the rechunked variables, uncompressed
    batch_s: dict[str, float] = field(default_factory=dict)  # seconds per batch of variables

    def summary(self) -> dict:
        return {
            "src": self.src,
            "dst": str(self.dst),
            "layout": self.layout,
            "chunks": list(self.chunks),
            "variables": self.variables,
            "seconds": round(self.seconds, 3),
            "workers": self.workers,
            "decoded_mb": round(self.decoded_mb, 1),
            "peak_worker_rss_mb": self.peak_worker_rss_mb,
            "baseline_worker_rss_mb": self.baseline_worker_rss_mb,
        }


def rechunk_cube(
    src: str | Path,
    dst: str | Path,
    layout: str,
    *,
    scheduler: str | None = None,
    storage_options: dict | None = None,
    force: bool = False,
    method: str = "p2p",
) -> RechunkResult:
    """Copy the cube `src` to the local Zarr store `dst` with the chunks of `layout`.

    `src`: a synthetic spec, a local Zarr path or a remote URL (read through fsspec with
    `storage_options`). `layout`: map, ts, balanced or `t,y,x`. `scheduler`: see
    `cubebench.cluster`; None means `local` here, since the peer-to-peer rechunk needs a
    distributed cluster. `dst` appears complete or not at all; an existing `dst` is replaced
    only with `force`, and only once the new copy is complete. `method`: dask's rechunk method
    (`tasks` only to measure what peer-to-peer saves). The group attribute `cubebench_layout`,
    where present, is set to `layout`; all other metadata is the source's.
    """
    if _is_remote(str(dst)) or "\x00" in str(dst):
        raise CubeError(f"the copy is written to a local path, not {str(dst)!r}")
    dst = Path(dst).expanduser()
    scheduler = scheduler or "local"
    parse_local(scheduler)  # a bad `local:N` fails before any work
    if not isinstance(layout, str):
        raise CubeError(f"a layout is a name or 't,y,x', got {layout!r}")
    layout_chunks(layout, (1, 1, 1))  # a bad layout fails before a synthetic SRC is generated
    if (dst.exists() or dst.is_symlink()) and not force:
        raise CubeError(f"{dst} exists; pass --force to overwrite it")
    cube = open_cube(src, storage_options=storage_options)  # CubeError unless a cube
    store = str(cube.attrs["cubebench_store"])
    shape = tuple(int(cube.sizes[d]) for d in DIMS)
    chunks = layout_chunks(layout, shape)  # type: ignore[arg-type]
    if not _is_remote(store):
        here = Path(store).resolve()
        there = dst.resolve()
        if there == here or here in there.parents or there in here.parents:
            raise CubeError(f"{dst} overlaps the source {store}: rechunk into another path")
    try:
        options = storage_options if "://" in store else None  # zarr takes them for URLs only
        group = zarr.open_group(store, mode="r", storage_options=options)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CubeError(f"rechunk reads Zarr cubes; cannot open {store} as one: {reason}") from None
    arrays = _arrays(group)
    plan = _plan(arrays, chunks)
    moved = [n for n, c in plan.items() if c is not None]
    result = RechunkResult(
        src=str(src),
        dst=dst,
        layout=layout,
        chunks=chunks,
        variables=moved,
        decoded_mb=sum(arrays[n].nbytes for n in moved) / 1e6,
    )
    started = time.perf_counter()
    _write_atomically(dst, lambda tmp: _copy(group, arrays, plan, tmp, scheduler, method, result))
    result.seconds = time.perf_counter() - started
    return result


def _dims(array: zarr.Array) -> tuple[str, ...] | None:
    """Canonical dimension names of a stored array (Zarr v3 metadata or xarray's v2 attr)."""
    names = getattr(array.metadata, "dimension_names", None)
    if not names:
        names = array.attrs.get("_ARRAY_DIMENSIONS")
    if not names or len(names) != array.ndim:
        return None
    return tuple(_CANONICAL_DIM.get(str(n), str(n)) for n in names)


def _arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    if any(True for _ in group.groups()):
        raise CubeError("rechunk copies flat cubes; this store has nested groups")
    return dict(group.arrays())


def _plan(
    arrays: dict[str, zarr.Array], chunks: tuple[int, int, int]
) -> dict[str, tuple[int, ...] | None]:
    """Array name -> its new chunk shape (None: copied as it is)."""
    wanted = dict(zip(DIMS, chunks))
    plan: dict[str, tuple[int, ...] | None] = {}
    for name, array in arrays.items():
        dims = _dims(array)
        if dims is None or not set(DIMS) <= set(dims):
            plan[name] = None
            continue
        if array.shards is not None:
            raise CubeError(f"variable {name!r} is sharded; rechunk handles unsharded arrays only")
        # other dims, if any, keep their chunks
        plan[name] = tuple(wanted.get(d, c) for d, c in zip(dims, array.chunks))
    if not any(c is not None for c in plan.values()):
        raise CubeError(f"no array with dims {DIMS} to rechunk")
    return plan


def _create_like(dst: zarr.Group, name: str, src: zarr.Array, chunks, write: bool) -> zarr.Array:
    """`src`'s metadata (codecs, fill value, attributes, dimension names) with `chunks`."""
    return zarr.from_array(
        dst.store,
        name=name,
        data=src,
        chunks=chunks or "keep",
        fill_value=src.fill_value,
        attributes=dict(src.attrs),
        write_data=write,
    )


def _copy(
    group: zarr.Group,
    arrays: dict[str, zarr.Array],
    plan: dict[str, tuple[int, ...] | None],
    tmp: Path,
    scheduler: str,
    method: str,
    result: RechunkResult,
) -> None:
    fmt = group.metadata.zarr_format
    attrs = dict(group.attrs)
    if "cubebench_layout" in attrs:  # it names the chunking, which is no longer the source's
        attrs["cubebench_layout"] = result.layout
    out = zarr.create_group(tmp, zarr_format=fmt, attributes=attrs)
    for name, chunks in plan.items():
        if chunks is None:  # coordinates and the like: small, copied here
            _create_like(out, name, arrays[name], None, write=True)
    with dask_client(scheduler) as client, _quiet_shuffle_logs():
        assert client is not None
        with _WorkerMemory(client) as memory:
            result.workers = len(client.scheduler_info()["workers"])
            for batch in _batches({n: arrays[n] for n, c in plan.items() if c is not None}):
                interrupts.check()
                began = time.perf_counter()
                sources = [arrays[name] for name in batch]
                targets = [_create_like(out, n, arrays[n], plan[n], write=False) for n in batch]
                moved = [
                    da.from_zarr(a).rechunk(plan[n], method=method) for n, a in zip(batch, sources)
                ]
                try:
                    da.store(moved, targets, lock=False, compute=True)
                except Exception:  # a corrupted chunk fails deep in a codec: say which
                    for name, source in zip(batch, sources):
                        _raise_unreadable_chunk(source, name, result.src)
                    raise
                result.batch_s["+".join(batch)] = round(time.perf_counter() - began, 3)
            client.run(_close_s3_sessions)
        result.peak_worker_rss_mb = memory.peak_mb
        result.baseline_worker_rss_mb = memory.baseline_mb
    # consolidated, as the ESDC's stores are: one read opens the cube, and xarray does not warn
    with warnings.catch_warnings():  # zarr: "not part of the Zarr format 3 specification"
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(tmp, zarr_format=fmt)


def _close_s3_sessions() -> None:
    """Close the S3 sessions of this process's cached s3fs filesystems, on zarr's event loop.
    zarr opens them asynchronous, so s3fs registers no closing of its own, and a dask worker
    that exits with one open prints "Unclosed client session"."""
    s3fs = sys.modules.get("s3fs")  # not imported: nothing to close
    if s3fs is None:
        return
    from zarr.core.sync import sync

    for fs in list(s3fs.S3FileSystem._cache.values()):
        if fs._s3creator is not None:
            with contextlib.suppress(Exception):
                sync(fs._s3creator.__aexit__(None, None, None))
            fs._s3 = fs._s3creator = None


def _batches(arrays: dict[str, zarr.Array]) -> list[list[str]]:
    """Variables rechunked together: up to BATCH_BYTES decoded, or one larger variable alone.
    Every rechunk has a fixed cost (a P2P shuffle's setup, ~1 s); memory follows the batch."""
    batches: list[list[str]] = []
    size = BATCH_BYTES
    for name, array in arrays.items():
        if size + array.nbytes > BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(name)
        size += array.nbytes
    return batches


def _raise_unreadable_chunk(array: zarr.Array, name: str, src: str) -> None:
    """Re-read `array` chunk by chunk and raise a ChunkReadError naming the first that fails."""
    for index in itertools.product(*(range(n) for n in array.cdata_shape)):
        try:
            array.blocks[index]
        except Exception as error:
            key = array.metadata.encode_chunk_key(index)
            reason = str(error).splitlines()[0][:200] if str(error) else ""
            raise ChunkReadError(
                f"cannot read {name!r} chunk {key} of {src}: {type(error).__name__}: {reason}"
            ) from None


@contextlib.contextmanager
def _quiet_shuffle_logs() -> Iterator[None]:
    """The scheduler logs every P2P shuffle's start and end as a WARNING: routine here."""
    logger = logging.getLogger("distributed.shuffle")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _write_atomically(dst: Path, write) -> None:
    """Run `write(tmp)` on a temporary sibling of `dst`, then swap it in: an existing `dst` is
    moved aside first and deleted only once the new one is in place."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CubeError(f"cannot write under {dst.parent}: {exc.strerror or exc}") from None
    tag = uuid.uuid4().hex[:8]
    tmp, old = (dst.parent / f".{dst.name}.{kind}-{tag}" for kind in ("new", "old"))
    try:  # made inside the try: an interrupt right after mkdir still removes it
        tmp.mkdir()
        write(tmp)
        interrupts.check()  # interrupted, even where a library swallowed it: commit nothing
        if dst.exists() or dst.is_symlink():
            os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except OSError:
            if old.exists() or old.is_symlink():
                os.replace(old, dst)
            raise
    except OSError as exc:
        raise CubeError(f"cannot write {dst}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():  # the write failed or was interrupted
            _finish_pending_zarr_io()
            shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        elif old.is_symlink():
            old.unlink()


def _finish_pending_zarr_io(timeout_s: float = 10.0) -> None:
    """Wait for the writes zarr still has in flight. An interrupt (Ctrl-C) stops this thread's
    wait for a zarr call, not the call: its coroutines go on in zarr's event loop thread and
    would recreate files under a temporary directory just removed."""
    import asyncio

    from zarr.core.sync import sync

    async def drain() -> None:
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    with contextlib.suppress(Exception):
        sync(drain())


class _WorkerMemory:
    """Peak of the summed resident memory of the cluster's workers, sampled from this process
    (psutil) when they run on this machine; None otherwise."""

    def __init__(self, client: Client) -> None:
        import psutil

        self.peak_mb: float | None = None
        self.baseline_mb: float | None = None
        self._stop = threading.Event()
        self._procs: list = []
        try:
            client.run(__import__, "dask.array")  # baseline: workers ready to read zarr
            client.run(__import__, "zarr")
            pids = client.run(os.getpid)  # builtins: the workers import nothing for them
            hosts = set(client.run(socket.gethostname).values())
            if hosts == {socket.gethostname()}:
                self._procs = [psutil.Process(p) for p in pids.values()]
        except Exception:
            self._procs = []
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _rss_mb(self) -> float:
        total = 0
        for proc in self._procs:
            with contextlib.suppress(Exception):  # a worker gone: counted as nothing
                total += proc.memory_info().rss
        return total / 1e6

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.peak_mb = max(self.peak_mb or 0.0, self._rss_mb())

    def __enter__(self) -> _WorkerMemory:
        if self._procs:
            self.baseline_mb = round(self._rss_mb(), 1)
            self.peak_mb = self.baseline_mb
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.peak_mb is not None:
            self.peak_mb = round(self.peak_mb, 1)
