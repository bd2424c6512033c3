"""Loader throughput from an S3 API against the same cube on local disk.

    python benchmarks/scripts/remote_vs_local.py [--cube synthetic:small] [--threads 1 4]
        [--epochs 1] [--reader zarr] [--latency-ms 0 20] [--json]

Starts a moto S3 server on 127.0.0.1 (a real HTTP server in its own process), uploads the cube
to it, then runs `bench_loader` on the local copy and on `s3://bench/<name>` with the same
settings, for each decode thread count. Both sides use the same chunk reader (zarr-python by
default: the one that reads remote stores), so the ratio is what the storage costs. Every
chunk of every variable is one GET. moto on loopback costs CPU per request (it is Python) but
has no network latency; `--latency-ms` puts a proxy in front of it that holds every answer's
first bytes that long, as an object store's time to first byte, which is where concurrent
requests (decode threads, both variables of a chunk at once) pay off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BUCKET = "bench"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """A moto S3 server process on 127.0.0.1; yields its endpoint URL. Sets fake credentials
    and keeps 127.0.0.1 off any proxy in this process's environment while it runs."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*CREDENTIALS, "NO_PROXY", "no_proxy")}
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    os.environ.update(CREDENTIALS | {"NO_PROXY": no_proxy, "no_proxy": no_proxy})
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}: {log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    response.read()
                break
            except urllib.error.HTTPError:
                break  # an HTTP answer, even an error, means the server is up
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server at {url} did not answer") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def latency_proxy(upstream: str, latency_s: float) -> Iterator[str]:
    """A TCP proxy in front of `upstream` (http://host:port) that holds the first bytes of
    every answer for `latency_s`: an object store's time to first byte, which loopback lacks.
    Requests on one connection are sequential (HTTP/1.1 without pipelining), so each request
    waits once; concurrent requests (several connections) wait at the same time."""
    import asyncio
    import threading
    from urllib.parse import urlsplit

    target = urlsplit(upstream)
    loop = asyncio.new_event_loop()
    ready: list = []

    async def pipe(reader, writer, waiting: asyncio.Event | None, delay: asyncio.Event | None):
        try:
            while data := await reader.read(1 << 16):
                if delay is not None and delay.is_set():  # the first bytes of an answer
                    delay.clear()
                    await asyncio.sleep(latency_s)
                if waiting is not None:  # a request went up: its answer will wait
                    waiting.set()
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(client_reader, client_writer):
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port)
        asked = asyncio.Event()
        await asyncio.gather(
            pipe(client_reader, up_writer, asked, None),
            pipe(up_reader, client_writer, None, asked),
        )

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready.append(server)
        with contextlib.suppress(asyncio.CancelledError):
            async with server:
                await server.serve_forever()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    while not ready:
        time.sleep(0.01)
    port = ready[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(ready[0].close)


def upload(local: Path, endpoint: str) -> tuple[str, dict, float]:
    """The cube copied into the bucket: (URL, storage options, seconds)."""
    import s3fs

    key, secret = CREDENTIALS["AWS_ACCESS_KEY_ID"], CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    fs = s3fs.S3FileSystem(
        key=key, secret=secret, client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True
    )
    started = time.perf_counter()
    with contextlib.suppress(FileExistsError):
        fs.mkdir(BUCKET)
    fs.put(str(local), f"{BUCKET}/{local.name}", recursive=True)
    options = {"endpoint_url": endpoint, "key": key, "secret": secret}
    return f"s3://{BUCKET}/{local.name}", options, time.perf_counter() - started


def _row(result: dict) -> dict:
    items = "windows" if result["geometry"] == "patch" else "pairs"
    return {
        "per_s": result[f"{items}_per_s"],
        "raw_per_s": result[f"raw_decode_{items}_per_s"],
        "items": result[items],
        "chunks": result["chunks_decoded"],
        "bytes_read": result["bytes_read"],
        "seconds": result["seconds"],
    }


def measure(args: argparse.Namespace) -> list[dict]:
    from cubebench.cube import open_cube
    from cubebench.loading.bench import bench_loader
    from cubebench.task import get_task, prepare_task

    spec = get_task(args.task)
    local_cube = open_cube(args.cube)
    store = Path(local_cube.attrs["cubebench_store"])
    started = time.perf_counter()
    local_task = prepare_task(spec, local_cube)
    prepare_local = time.perf_counter() - started

    def bench(task, threads: int, options: dict | None) -> dict:
        return _row(
            bench_loader(
                task,
                part=args.part,
                batch_size=args.batch_size,
                epochs=args.epochs,
                threads=threads,
                reader=args.reader,
                storage_options=options,
            )
        )

    local = {threads: bench(local_task, threads, None) for threads in args.threads}
    rows = []
    with tempfile.TemporaryDirectory() as tmp, moto_server(Path(tmp) / "moto.log") as endpoint:
        url, options, upload_s = upload(store, endpoint)
        started = time.perf_counter()
        remote_task = prepare_task(spec, open_cube(url, storage_options=options))
        prepare_remote = time.perf_counter() - started  # reads every chunk over S3 once
        assert remote_task.samples == local_task.samples
        stored = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        print(
            f"{args.cube} ({store.name}, {stored / 1e6:.1f} MB stored): upload {upload_s:.1f} s;"
            f" prepare {prepare_local:.2f} s local, {prepare_remote:.2f} s over S3",
            file=sys.stderr,
        )
        for latency_ms in args.latency_ms:
            with contextlib.ExitStack() as stack:
                via = endpoint
                if latency_ms > 0:
                    via = stack.enter_context(latency_proxy(endpoint, latency_ms / 1000))
                for threads in args.threads:
                    remote = bench(remote_task, threads, options | {"endpoint_url": via})
                    row = {"latency_ms": latency_ms, "threads": threads}
                    row |= {f"local_{k}": v for k, v in local[threads].items()}
                    row |= {f"remote_{k}": v for k, v in remote.items()}
                    row["ratio"] = remote["per_s"] / local[threads]["per_s"]
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    return rows


def table(rows: list[dict], reader: str) -> str:
    lines = [
        "| added latency | threads | local samples/s | S3 samples/s | S3 / local | bytes read "
        "| chunks decoded |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = (r["local_bytes_read"], r["local_chunks"]) == (
            r["remote_bytes_read"],
            r["remote_chunks"],
        )
        lines.append(
            f"| {r['latency_ms']:g} ms | {r['threads']} | {r['local_per_s'] / 1e6:.3f} M"
            f" | {r['remote_per_s'] / 1e6:.3f} M | {r['ratio']:.3f}"
            f" | {r['remote_bytes_read'] / 1e6:.1f} MB | {r['remote_chunks']}"
            f"{'' if same else ' (local differs!)'} |"
        )
    lines.append(f"(reader {reader} on both sides; bytes read: compressed, the same local and S3)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cube", default="synthetic:small")
    parser.add_argument("--task", default="lst-from-t2m")
    parser.add_argument("--part", default="train")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--reader", default="zarr", help="the same on both sides (default: zarr)")
    parser.add_argument(
        "--latency-ms",
        type=float,
        nargs="+",
        default=[0.0, 20.0],
        help="time to first byte added to every S3 answer by a proxy (default: 0 20)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON line per thread count")
    args = parser.parse_args()
    rows = measure(args)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(table(rows, args.reader))


if __name__ == "__main__":
    main()
