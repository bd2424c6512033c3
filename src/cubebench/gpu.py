"""GPU figures of a cuda result (`result["gpu"]`): how busy NVML saw the GPU while the case
fitted, and how long the host-to-device copies of its training batches took on the device.

Utilisation is NVML's (`nvmlDeviceGetUtilizationRates(handle).gpu`, what `nvidia-smi`
shows): the percentage of time over the last sample period during which one or more kernels
ran on the GPU, the period being between 1/6 s and 1 s depending on the product. It says
that the GPU was busy, not how much of it: one small kernel at a time reads 100 %. A
`Sampler` reads it every `interval_s` (INTERVAL_S) on a daemon thread during `fit()`; the
readings overlap (the interval is shorter than NVML's period), so their mean is a time
average over the fit, late by up to one period. Their summary (`summarise`): the mean, the
10th percentile (`np.percentile(..., method="linear")`: linear interpolation between the
order statistics, numpy's default), the count and the interval.

Host-to-device copies: `CopyClock` holds the CUDA events that
`cubebench.loading.torch.CudaCopier` records on its copy stream around each training batch's
copies, and sums the device time between them after the fit (never a wait in the loop).

No framework at the top: pynvml (`nvidia-ml-py`, in the `track` extra) is imported inside the
functions, torch and TensorFlow are only asked when the case has already imported them.
Without nvidia-ml-py, a driver or the device, `sampling` yields None: the case never sees
an NVML error.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

INTERVAL_S = 0.05  # seconds between NVML readings
PERCENTILE = 10  # the low tail of the utilisation: how idle the GPU was at its worst
PERCENTILE_METHOD = "linear"  # numpy's default: interpolated between order statistics
JOIN_TIMEOUT_S = 5.0  # a reading stuck in the driver must not hold up the case
FOLD_PAIRS = 64  # copy events held before the finished ones are summed (no wait)

# (utilisation %, device memory used in bytes or None)
Reading = tuple[float, float | None]


@dataclass(frozen=True)
class Utilisation:
    """A summary of utilisation readings: mean and PERCENTILE-th percentile (None without
    readings), their count."""

    mean: float | None
    p10: float | None
    count: int


def summarise(readings: Sequence[float]) -> Utilisation:
    """Mean and 10th percentile (`np.percentile`, method PERCENTILE_METHOD) of `readings`."""
    if not len(readings):
        return Utilisation(None, None, 0)
    values = np.asarray(readings, np.float64)
    p10 = np.percentile(values, PERCENTILE, method=PERCENTILE_METHOD)
    return Utilisation(float(values.mean()), float(p10), len(values))


class Sampler:
    """`read()` every `interval_s` on a daemon thread while inside `with`: the first reading
    one interval after entering, none after leaving. Leaving stops and joins the thread
    (also when the block raised: the exception goes on). A reading that raises (NVML gone,
    not supported on the device) ends the sampling with what was read, its error kept in
    `error`; the block never sees it."""

    def __init__(
        self, read: Callable[[], Reading], interval_s: float = INTERVAL_S, name: str | None = None
    ):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.read = read
        self.interval_s = float(interval_s)
        self.name = name  # the device's, for the result
        self.utilisation: list[float] = []
        self.memory: list[float] = []  # bytes used on the device, where read
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cubebench-gpu", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                utilisation, memory = self.read()
            except Exception as error:  # whatever NVML raises: stop, keep the readings
                self.error = f"{type(error).__name__}: {error}".splitlines()[0][:200]
                return
            self.utilisation.append(float(utilisation))
            if memory is not None:
                self.memory.append(float(memory))

    def summary(self) -> Utilisation:
        return summarise(list(self.utilisation))


@contextlib.contextmanager
def sampling(device: str, interval_s: float = INTERVAL_S) -> Iterator[Sampler | None]:
    """A running `Sampler` of this process's GPU (`nvml_device`) while inside; None on the
    CPU, or without nvidia-ml-py, a driver or the device. NVML is opened before the block
    and shut after it, so neither lands in what the block times."""
    opened = nvml_device() if device == "cuda" else None
    if opened is None:
        yield None
        return
    read, name, close = opened
    try:
        with Sampler(read, interval_s, name) as sampler:
            yield sampler
    finally:
        close()


# --------------------------------------------------------------------------------------------
# which NVML device this process computes on


def cuda_ordinal() -> int:
    """This process's CUDA device, as CUDA numbers the visible ones: torch's current device
    where torch has initialised CUDA (a DDP rank set its LOCAL_RANK's), else LOCAL_RANK,
    else 0 (TensorFlow's GPU:0)."""
    torch = _torch_cuda()
    if torch is not None:
        return int(torch.cuda.current_device())
    return int(os.environ.get("LOCAL_RANK", 0))


def nvml_targets(
    ordinal: int,
    visible: str | None,
    uuid: str | None = None,
    pci_bus_id: str | None = None,
) -> list[tuple[str, Any]]:
    """How to find CUDA device `ordinal` among NVML's devices, best first: `("uuid", u)`,
    `("pci", bus id)` or `("index", NVML index)`.

    The UUID and PCI bus id (from torch) name the device itself. Without them, the
    `ordinal`-th entry of CUDA_VISIBLE_DEVICES (`visible`; None: unset, every device): an
    index, or a (possibly shortened) `GPU-`/`MIG-` UUID. An index is NVML's only if CUDA
    numbers devices in PCI order as NVML does (CUDA_DEVICE_ORDER=PCI_BUS_ID, or identical
    GPUs)."""
    targets: list[tuple[str, Any]] = []
    if uuid:
        targets.append(("uuid", uuid))
    if pci_bus_id:
        targets.append(("pci", pci_bus_id))
    if visible is None:
        return [*targets, ("index", ordinal)]
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if not 0 <= ordinal < len(entries):
        return targets
    entry = entries[ordinal]
    if entry.isdigit():
        targets.append(("index", int(entry)))
    elif entry.upper().startswith(("GPU-", "MIG-")):
        targets.append(("uuid", entry))
    return targets


def _bare_uuid(uuid: str) -> str:
    text = uuid.strip().lower()
    return text[4:] if text.startswith(("gpu-", "mig-")) else text


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _by_uuid(pynvml: Any, uuid: str) -> Any:
    """The device of a full UUID (with or without its prefix), else the one device whose UUID
    starts with it, as CUDA_VISIBLE_DEVICES allows; None if none or several."""
    bare = _bare_uuid(uuid)
    if not bare:
        return None
    full = [uuid] if uuid.upper().startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
    for candidate in full:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(candidate)
        except pynvml.NVMLError:
            continue
    found = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        if _bare_uuid(_text(pynvml.nvmlDeviceGetUUID(handle))).startswith(bare):
            found.append(handle)
    return found[0] if len(found) == 1 else None


def _resolve(pynvml: Any, targets: list[tuple[str, Any]]) -> Any:
    """The handle of the first target NVML knows, else None."""
    for kind, value in targets:
        try:
            if kind == "uuid":
                handle = _by_uuid(pynvml, value)
            elif kind == "pci":
                handle = pynvml.nvmlDeviceGetHandleByPciBusId(value)
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(value)
        except pynvml.NVMLError:
            continue
        if handle is not None:
            return handle
    return None


def _torch_identity(ordinal: int) -> tuple[str | None, str | None]:
    """(UUID, PCI bus id) of torch's device `ordinal`, where torch has initialised CUDA and
    its device properties carry them."""
    torch = _torch_cuda()
    if torch is None:
        return None, None
    try:
        props = torch.cuda.get_device_properties(ordinal)
    except Exception:
        return None, None
    uuid = str(getattr(props, "uuid", "") or "") or None
    bus = getattr(props, "pci_bus_id", None)
    pci = None
    if isinstance(bus, int):
        domain = getattr(props, "pci_domain_id", 0) or 0
        device = getattr(props, "pci_device_id", 0) or 0
        pci = f"{domain:08x}:{bus:02x}:{device:02x}.0"
    return uuid, pci


def nvml_device() -> tuple[Callable[[], Reading], str | None, Callable[[], None]] | None:
    """(read, device name, close) for this process's CUDA device (`cuda_ordinal`, matched by
    `nvml_targets`): `read()` gives its utilisation % and memory used (bytes). None without
    nvidia-ml-py, a driver or a matching device; `close()` shuts NVML down again."""
    try:
        import pynvml
    except Exception:  # not installed (or broken): no NVML
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no libnvidia-ml, no driver
        return None
    try:
        ordinal = cuda_ordinal()
        uuid, pci = _torch_identity(ordinal)
        targets = nvml_targets(ordinal, os.environ.get("CUDA_VISIBLE_DEVICES"), uuid, pci)
        handle = _resolve(pynvml, targets)
        name = None if handle is None else _text(pynvml.nvmlDeviceGetName(handle))
    except Exception:
        handle = None
    if handle is None:
        _shutdown(pynvml)
        return None

    def read() -> Reading:
        utilisation = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        try:
            memory = float(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except pynvml.NVMLError:
            memory = None
        return float(utilisation), memory

    return read, name, lambda: _shutdown(pynvml)


def _shutdown(pynvml: Any) -> None:
    with contextlib.suppress(Exception):
        pynvml.nvmlShutdown()


def _torch_cuda() -> Any:
    """torch, where the case imported it and CUDA is initialised (asking more would start a
    CUDA context of its own); else None."""
    torch = sys.modules.get("torch")
    try:
        return torch if torch is not None and torch.cuda.is_initialized() else None
    except Exception:
        return None


def device_name() -> str | None:
    """The name of this process's GPU as the framework sees it (torch, else TensorFlow's
    GPU:0), where NVML could not say; None if neither has it."""
    torch = _torch_cuda()
    try:
        if torch is not None:
            return str(torch.cuda.get_device_name(cuda_ordinal()))
        tf = sys.modules.get("tensorflow")
        if tf is not None:
            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                return tf.config.experimental.get_device_details(gpus[0]).get("device_name")
    except Exception:
        pass
    return None


def gpu_peak_mb() -> float | None:
    """Peak GPU memory the framework allocated, MiB: torch's `max_memory_allocated` where
    torch initialised CUDA, else TensorFlow's `get_memory_info("GPU:0")["peak"]` where the
    case imported TensorFlow; None otherwise."""
    torch = _torch_cuda()
    try:
        if torch is not None:
            return round(torch.cuda.max_memory_allocated() / 2**20, 1)
        tf = sys.modules.get("tensorflow")
        if tf is not None:
            return round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, 1)
    except Exception:  # no such device: not measured
        pass
    return None


# --------------------------------------------------------------------------------------------
# host-to-device copies


class CopyClock:
    """Host-to-device copies of a case's training batches, timed on the device.

    `cubebench.loading.torch.CudaCopier` records a timing event on its copy stream before a
    batch's copies and one after them (`record(start, end, nbytes)`); `seconds()` sums the
    device time between each pair (`start.elapsed_time(end)`), after the fit. Nothing waits
    in the loop: every FOLD_PAIRS pairs, those already past (`end.query()`, which does not
    wait) are summed and let go, so that few events are held; `seconds()` waits for the
    rest. The time between the events is the copy stream's: the copies themselves, plus any
    gap while the host was still issuing them (microseconds a batch).

    `note` says why nothing is recorded where a framework copies inside its own step
    (Keras). Works with any events that have `query`, `synchronize` and `elapsed_time`
    (milliseconds), as torch's do."""

    def __init__(self) -> None:
        self.pending: deque[tuple[Any, Any]] = deque()
        self.milliseconds = 0.0
        self.bytes = 0
        self.copies = 0
        self.note: str | None = None

    def record(self, start: Any, end: Any, nbytes: int) -> None:
        self.pending.append((start, end))
        self.bytes += int(nbytes)
        self.copies += 1
        if len(self.pending) >= FOLD_PAIRS:
            self._fold(wait=False)

    def _fold(self, wait: bool) -> None:
        while self.pending:
            start, end = self.pending[0]
            if wait:
                end.synchronize()
            elif not end.query():
                return
            self.milliseconds += start.elapsed_time(end)
            self.pending.popleft()

    def seconds(self) -> float | None:
        """Device seconds of every recorded copy (waits for the last ones); None without."""
        if not self.copies:
            return None
        self._fold(wait=True)
        return self.milliseconds / 1000.0
