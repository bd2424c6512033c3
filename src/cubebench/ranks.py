"""Torch DDP ranks: which one this process is, and the few collectives the suite needs.

`cubebench run --nproc N` starts a case's worker under torchrun (`torch.distributed.run`),
which sets RANK, WORLD_SIZE and LOCAL_RANK. The suite's own code asks `rank()`/`world_size()`
(no torch import, so pixel cases stay framework-free) and reduces through `gather`, which is
the identity on a single process.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

# a rank that waits longer than this for its peers has lost one: fail instead of hanging
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    """True inside a rank of a multi-process run whose process group is up."""
    if world_size() == 1:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def backend(device: str) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device == "cuda" else "gloo"


def start(device: str) -> None:
    """Join the process group torchrun described in the environment (no-op on one process).
    Each rank uses the GPU of its local rank."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    if device == "cuda":
        if torch.cuda.device_count() < world_size():
            raise RuntimeError(
                f"{world_size()} ranks need {world_size()} GPUs, found {torch.cuda.device_count()}"
            )
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend(device), timeout=COLLECTIVE_TIMEOUT)


def stop() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not is_distributed():
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def total(*values: float) -> tuple[float, ...]:
    """Sums over the ranks of each of `values` (float64, in one all-reduce)."""
    if not is_distributed():
        return tuple(float(v) for v in values)
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return tuple(float(v) for v in summed.cpu())
