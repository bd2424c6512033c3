"""GPU figures (`cubebench.gpu`, `result["gpu"]`): the NVML sampler's statistics and thread,
the matching of this process's CUDA device to an NVML device (with a stand-in NVML), the
copy clock's sums without waits in the loop, the result record on the CPU (null) and with a
filled block (valid, in the report), the GPU entries of environment.json, and on a CUDA
machine the real thing: utilisation, copy time and bytes of torch-mlp's training batches."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cubebench import gpu, results
from cubebench.discovery import discover
from cubebench.errors import CubebenchError
from cubebench.loading import open_stream
from cubebench.loading.torch import to_device
from cubebench.measure import gpu_record, run_case
from cubebench.report import RunResults, write_report
from cubebench.report.render import environment_facts
from test_report import ENVIRONMENT, PIXELS, _mlp, _result, _section, _task_table, _write_run

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_KEYS = {
    "name",
    "utilisation_mean_pct",
    "utilisation_p10_pct",
    "utilisation_samples",
    "sample_interval_s",
    "h2d_copy_s",
    "h2d_bytes",
    "h2d_note",
}
# readings whose 10th percentile differs by method (linear 3.8, lower 3, nearest 3, higher 12)
READINGS = [37.0, 100.0, 3.0, 52.0, 99.0, 12.0, 64.0, 81.0, 0.0, 45.0, 77.0, 28.0]


class Exhausted(Exception):
    pass


def reading_sequence(values, memory=None):
    """A reading function that gives `values` in order, then raises (which ends sampling)."""
    left = list(values)
    used = list(memory) if memory is not None else None

    def read():
        if not left:
            raise Exhausted("no more readings")
        return left.pop(0), used.pop(0) if used else None

    return read


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


# --- the sampler ---------------------------------------------------------------------------


def test_the_summary_is_numpys_mean_and_linear_10th_percentile():
    memory = [float(i) * 2**20 for i in range(len(READINGS))]
    sampler = gpu.Sampler(reading_sequence(READINGS, memory), interval_s=0.001, name="X")
    with sampler:
        wait_for(lambda: not sampler.running)  # every reading taken, then the end
    assert sampler.utilisation == READINGS and sampler.memory == memory
    assert sampler.error == "Exhausted: no more readings"
    summary = sampler.summary()
    assert summary.count == len(READINGS)
    assert summary.mean == pytest.approx(np.mean(READINGS), rel=1e-12)
    assert summary.p10 == pytest.approx(np.percentile(READINGS, 10, method="linear"), rel=1e-12)
    assert summary.p10 != np.percentile(READINGS, 10, method="lower")  # the method matters
    assert gpu.summarise([]) == gpu.Utilisation(None, None, 0)


def test_the_thread_stops_and_joins_when_the_block_exits_even_on_an_exception():
    sampler = gpu.Sampler(lambda: (50.0, None), interval_s=0.001)
    with pytest.raises(KeyError, match="boom"), sampler:
        wait_for(lambda: len(sampler.utilisation) >= 3)
        assert sampler.running
        raise KeyError("boom")
    assert not sampler.running and sampler.error is None
    taken = len(sampler.utilisation)
    time.sleep(0.05)
    assert len(sampler.utilisation) == taken  # nothing read after the block
    names = [t.name for t in threading.enumerate()]
    assert "cubebench-gpu" not in names


def test_leaving_does_not_wait_for_the_interval_and_reads_nothing_before_it():
    sampler = gpu.Sampler(lambda: (50.0, None), interval_s=30.0)
    start = time.perf_counter()
    with sampler:
        pass
    assert time.perf_counter() - start < 5.0 and not sampler.running
    assert sampler.summary() == gpu.Utilisation(None, None, 0)
    with pytest.raises(ValueError):
        gpu.Sampler(lambda: (0.0, None), interval_s=0.0)


def test_without_nvml_there_is_no_sampler(monkeypatch):
    with gpu.sampling("cpu") as sampler:
        assert sampler is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    assert gpu.nvml_device() is None
    with gpu.sampling("cuda") as sampler:
        assert sampler is None


@pytest.mark.skipif(gpu.nvml_device() is not None, reason="NVML answers on this machine")
def test_without_a_driver_there_is_no_sampler():
    with gpu.sampling("cuda") as sampler:
        assert sampler is None


# --- which NVML device ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ordinal", "visible", "uuid", "pci", "targets"),
    [
        (0, None, None, None, [("index", 0)]),
        (1, None, None, None, [("index", 1)]),
        (1, "3,5", None, None, [("index", 5)]),
        (0, " 2 , 0", None, None, [("index", 2)]),
        (0, "GPU-8a2f,1", None, None, [("uuid", "GPU-8a2f")]),
        (0, "MIG-77aa", None, None, [("uuid", "MIG-77aa")]),
        (2, "0,1", None, None, []),  # not a visible device
        (0, "", None, None, []),
        (0, "1", "8a2f-00", None, [("uuid", "8a2f-00"), ("index", 1)]),
        (
            0,
            None,
            "8a2f-00",
            "00000000:3b:00.0",
            [("uuid", "8a2f-00"), ("pci", "00000000:3b:00.0"), ("index", 0)],
        ),
    ],
)
def test_the_nvml_device_is_found_by_uuid_pci_then_visible_index(
    ordinal, visible, uuid, pci, targets
):
    assert gpu.nvml_targets(ordinal, visible, uuid, pci) == targets


class FakeNvml:
    """NVML's device lookups over a fixed list of UUIDs (handles are the indices)."""

    class NVMLError(Exception):
        pass

    def __init__(self, uuids):
        self.uuids = uuids

    def nvmlDeviceGetCount(self):
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < len(self.uuids):
            raise self.NVMLError("invalid argument")
        return index

    def nvmlDeviceGetUUID(self, handle):
        return self.uuids[handle].encode()  # older nvidia-ml-py: bytes

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.uuids:
            raise self.NVMLError("not found")
        return self.uuids.index(uuid)

    def nvmlDeviceGetHandleByPciBusId(self, bus):
        raise self.NVMLError("not found")


def test_uuids_match_whole_with_or_without_prefix_or_by_a_unique_start():
    nvml = FakeNvml(["GPU-aa11-0000", "GPU-aa22-0000", "GPU-bb33-0000"])
    assert gpu._resolve(nvml, [("uuid", "bb33-0000")]) == 2  # torch's: no prefix
    assert gpu._resolve(nvml, [("uuid", "GPU-AA22-0000")]) == 1  # any case
    assert gpu._resolve(nvml, [("uuid", "GPU-aa2")]) == 1  # shortened, unique
    assert gpu._resolve(nvml, [("uuid", "GPU-aa")]) is None  # ambiguous
    assert gpu._resolve(nvml, [("uuid", "GPU-aa"), ("index", 2)]) == 2  # the next target
    assert gpu._resolve(nvml, [("pci", "0:3b:0.0"), ("index", 7), ("index", 0)]) == 0


def test_the_ordinal_is_the_local_rank_without_torchs_cuda(monkeypatch):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("torch has a current CUDA device here")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert gpu.cuda_ordinal() == 3
    monkeypatch.delenv("LOCAL_RANK")
    assert gpu.cuda_ordinal() == 0


# --- the copy clock ------------------------------------------------------------------------


class Event:
    """A CUDA event stand-in: a time stamp (ms), past or not, counting the waits. The two
    events of a copy share their state: on one stream, the end past means the start is."""

    waits = 0

    def __init__(self, ms: float, state: list[bool] | None = None):
        self.ms, self.state = ms, state if state is not None else [True]

    def query(self) -> bool:
        return self.state[0]

    def synchronize(self) -> None:
        Event.waits += 1
        self.state[0] = True

    def elapsed_time(self, end: Event) -> float:
        assert self.state[0] and end.state[0], "elapsed_time of an event not yet past"
        return end.ms - self.ms


def pair(start_ms: float, ms: float, done: bool = True) -> tuple[Event, Event]:
    state = [done]
    return Event(start_ms, state), Event(start_ms + ms, state)


def test_the_copy_clock_sums_device_time_and_bytes_waiting_only_at_the_end():
    clock = gpu.CopyClock()
    assert clock.seconds() is None  # nothing copied: not measured
    Event.waits = 0
    durations = [0.5 + (i % 7) * 0.25 for i in range(3 * gpu.FOLD_PAIRS)]
    for i, ms in enumerate(durations):
        done = i < 2 * gpu.FOLD_PAIRS  # the last ones still in flight
        clock.record(*pair(10.0 * i, ms, done), 100 + i)
    assert Event.waits == 0  # recording never waits
    assert len(clock.pending) < 2 * gpu.FOLD_PAIRS  # the finished ones were let go
    assert clock.seconds() == pytest.approx(sum(durations) / 1000.0, rel=1e-12)
    assert Event.waits >= 1 and not clock.pending
    assert clock.bytes == sum(100 + i for i in range(len(durations)))
    assert clock.copies == len(durations)


def test_on_the_cpu_to_device_records_no_copy():
    clock = gpu.CopyClock()
    batches = [(np.ones((4, 3), np.float32), np.ones(4, np.float32))] * 3
    assert len(list(to_device(batches, "cpu", clock=clock))) == 3
    assert clock.copies == 0 and clock.seconds() is None


# --- the result ----------------------------------------------------------------------------


def test_a_cpu_run_has_a_null_gpu_block(tiny_task):
    cls = discover()["torch-mlp"][1]
    measured = run_case(
        cls,
        tiny_task.cube,
        run_id="test",
        params={**cls.test_parameters, "epochs": 1},
        device="cpu",
        threads=1,
        environment=results.environment_manifest(1, 0),
        task=tiny_task,
    )
    result = measured.result
    assert result["status"] == "ok", result["reason"]
    assert "gpu" in result and result["gpu"] is None
    assert measured.context.copies.copies == 0
    results.validate(result)
    blank = results.new_result(
        run_id="r",
        case="c",
        library="l",
        task="t",
        params={},
        seed=0,
        split_seed=0,
        repeat=0,
        threads=1,
        world_size=1,
        device="cuda",
        cube_spec="s",
        environment={},
    )
    assert "gpu" in blank and blank["gpu"] is None  # runner.failed_result's results too


def test_the_gpu_record_of_a_sampler_and_a_clock():
    sampler = gpu.Sampler(reading_sequence(READINGS, [2**30] * len(READINGS)), 0.001, "GPU X")
    with sampler:
        wait_for(lambda: not sampler.running)
    clock = gpu.CopyClock()
    clock.record(*pair(0.0, 1.5), 4096)
    clock.record(*pair(2.0, 0.25), 1024)
    record = gpu_record(sampler, clock)
    assert set(record) >= GPU_KEYS
    assert record["name"] == "GPU X"
    assert record["utilisation_mean_pct"] == round(float(np.mean(READINGS)), 2)
    assert record["utilisation_p10_pct"] == round(float(np.percentile(READINGS, 10)), 2)
    assert record["utilisation_samples"] == len(READINGS)
    assert record["sample_interval_s"] == 0.001 and record["utilisation_note"] is None
    assert record["memory_used_max_mb"] == 1024.0
    assert record["h2d_copy_s"] == pytest.approx(0.00175) and record["h2d_bytes"] == 5120
    assert record["h2d_note"] is None
    keras = gpu.CopyClock()
    keras.note = "copies inside the step"
    record = gpu_record(None, keras)  # no NVML, a framework that copies itself
    assert record["utilisation_mean_pct"] is None and record["utilisation_samples"] == 0
    assert record["utilisation_note"] and record["sample_interval_s"] == gpu.INTERVAL_S
    assert record["h2d_copy_s"] is None and record["h2d_bytes"] is None
    assert record["h2d_note"] == "copies inside the step"
    assert "to_device" in gpu_record(None, gpu.CopyClock())["h2d_note"]


FILLED = {
    "name": "NVIDIA H200",
    "utilisation_mean_pct": 87.25,
    "utilisation_p10_pct": 61.5,
    "utilisation_samples": 240,
    "sample_interval_s": 0.05,
    "utilisation_note": None,
    "memory_used_max_mb": 2048.0,
    "h2d_copy_s": 0.4321,
    "h2d_bytes": 123456789,
    "h2d_note": None,
}


def test_results_with_and_without_a_gpu_block_validate():
    results.validate(_result("torch-mlp", device="cuda", gpu=FILLED))
    results.validate(_result("torch-mlp", gpu=None))
    results.validate(_mlp())  # written before the block: no key at all
    keras = {**FILLED, "h2d_copy_s": None, "h2d_bytes": None, "h2d_note": "inside the step"}
    results.validate(_result("keras-mlp", library="keras", device="cuda", gpu=keras))
    for bad in ({**FILLED, "utilisation_mean_pct": 101.0}, {**FILLED, "h2d_bytes": 1.5}):
        with pytest.raises(CubebenchError, match="gpu"):
            results.validate(_result("torch-mlp", device="cuda", gpu=bad))
    missing = {k: v for k, v in FILLED.items() if k != "h2d_note"}
    with pytest.raises(CubebenchError, match="h2d_note"):
        results.validate(_result("torch-mlp", device="cuda", gpu=missing))


GPU_HEADERS = ("GPU util %", "GPU util p10 %", "H2D copy s")


def test_the_report_shows_gpu_columns_only_when_a_result_ran_on_cuda(tmp_path: Path):
    plain = _write_run(tmp_path / "cpu", [_mlp()])
    write_report(plain)
    row = _task_table((plain / "report.md").read_text(), PIXELS)["torch-mlp"]
    assert not set(GPU_HEADERS) & set(row)
    assert "NVML" not in (plain / "report.md").read_text()

    keras = {**FILLED, "utilisation_mean_pct": 40.0, "h2d_copy_s": None, "h2d_bytes": None}
    cuda = [
        _result("torch-mlp", device="cuda", gpu=FILLED),
        _result("keras-mlp", library="keras", device="cuda", gpu={**keras, "h2d_note": "n"}),
        _result("sklearn-sgd", library="scikit-learn", gpu=None),
    ]
    run = _write_run(tmp_path / "cuda", cuda)
    write_report(run)
    text = (run / "report.md").read_text()
    rows = _task_table(text, PIXELS)
    assert rows["torch-mlp"]["GPU util %"] == "87.2"  # 3 significant digits, as every cell
    assert rows["torch-mlp"]["GPU util p10 %"] == "61.5"
    assert rows["torch-mlp"]["H2D copy s"] == "0.432"
    assert rows["keras-mlp"]["GPU util %"] == "40.0" and rows["keras-mlp"]["H2D copy s"] == "—"
    assert rows["sklearn-sgd"]["GPU util %"] == "—"
    assert "1/6 s to 1 s" in _section(text, f"Task: {PIXELS}")  # what NVML's figure is
    page = (run / "report.html").read_text()
    assert all(f">{h}</th>" in page for h in GPU_HEADERS)
    table = RunResults(run).table()
    assert table.loc["torch-mlp", "GPU util %"] == 87.25
    assert table.loc["torch-mlp", "H2D copy s"] == 0.4321


# --- environment.json ----------------------------------------------------------------------

SMI = """#!/bin/sh
case "$1" in
  *compute_cap*) [ -n "$OLD_DRIVER" ] && { echo 'Field "compute_cap" is not valid' >&2; exit 2; }
    echo "NVIDIA H200, 570.86.15, 143771 MiB, GPU-aa11, 9.0"
    echo "NVIDIA H200, 570.86.15, 143771 MiB, GPU-bb22, [N/A]" ;;
  *) echo "Tesla V100, 470.1, 16160 MiB, GPU-cc33" ;;
esac
"""


def test_the_environment_lists_every_gpu(tmp_path: Path, monkeypatch):
    (tmp_path / "nvidia-smi").write_text(SMI)
    (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    found = results._gpu()
    assert found["count"] == 2 and found["name"] == "NVIDIA H200"  # the keys old readers use
    assert found["driver"] == "570.86.15" and found["memory"] == "143771 MiB"
    assert found["devices"][1] == {
        "name": "NVIDIA H200",
        "driver": "570.86.15",
        "memory": "143771 MiB",
        "uuid": "GPU-bb22",
        "compute_capability": None,
    }
    assert found["devices"][0]["compute_capability"] == "9.0"
    assert set(found["cuda_builds"]) <= {"torch", "tensorflow"}
    monkeypatch.setenv("OLD_DRIVER", "1")
    old = results._gpu()  # a driver without compute_cap: asked without it
    assert old["devices"] == [
        {"name": "Tesla V100", "driver": "470.1", "memory": "16160 MiB", "uuid": "GPU-cc33"}
    ]
    shown = {**found, "cuda_builds": {"torch": "12.8", "tensorflow": None}}
    facts = dict(environment_facts({**ENVIRONMENT, "gpu": shown}))
    assert facts["GPU"] == (
        "2 × NVIDIA H200 (driver 570.86.15, 143771 MiB, compute capability 9.0, "
        "built for CUDA: torch 12.8)"
    )
    older = {"count": 1, "name": "A100", "driver": "535", "memory": "40960 MiB"}
    assert dict(environment_facts({**ENVIRONMENT, "gpu": older}))["GPU"] == (
        "1 × A100 (driver 535, 40960 MiB)"
    )


@pytest.mark.parametrize(
    ("name", "text", "version"),
    [
        ("torch", "__version__ = '2.8.0+cu128'\ncuda: Optional[str] = '12.8'\n", "12.8"),
        ("torch", "cuda: Optional[str] = None\n", None),
        ("tensorflow", "build_info = OrderedDict([('cuda_version', '12.5.1')])", "12.5.1"),
        ("tensorflow", "build_info = OrderedDict([('is_cuda_build', False)])", None),
    ],
)
def test_the_cuda_a_framework_was_built_for_is_read_from_its_files(name, text, version):
    import re

    _, pattern = results._CUDA_BUILD_FILES[name]
    found = re.search(pattern, text, re.MULTILINE)
    assert (found.group(1) if found else None) == version


# --- on a GPU ------------------------------------------------------------------------------


def _training_bytes(task, batch_size: int, epochs: int) -> int:
    """Bytes of every training batch of every epoch, as the stream hands them out."""
    stream = open_stream(task, "train", batch_size=batch_size, threads=1)
    return sum(np.asarray(a).nbytes for e in range(epochs) for b in stream.batches(e) for a in b)


@CUDA
def test_on_cuda_the_clock_times_every_copy_and_counts_its_bytes():
    rows = 1 << 16
    batches = [(np.full((rows, 8), i, np.float32), np.full(rows, i, np.float32)) for i in range(5)]
    clock = gpu.CopyClock()
    got = [tuple(t.cpu() for t in b) for b in to_device(batches, "cuda", 2, clock)]
    assert len(got) == 5 and float(got[3][0][0, 0]) == 3.0
    assert clock.copies == 5
    assert clock.bytes == sum(a.nbytes for b in batches for a in b)
    assert 0.0 < clock.seconds() < 5.0


@CUDA
def test_on_cuda_the_sampler_watches_the_device_torch_computes_on():
    if gpu.nvml_device() is None:
        pytest.skip("no NVML on this CUDA machine")
    x = torch.randn(4096, 4096, device="cuda")
    with gpu.sampling("cuda") as sampler:
        end = time.perf_counter() + 1.5
        while time.perf_counter() < end:
            x = (x @ x).clamp_(-1.0, 1.0)
        torch.cuda.synchronize()
    assert sampler.name == torch.cuda.get_device_name(torch.cuda.current_device())
    summary = sampler.summary()
    assert summary.count >= 5 and sampler.error is None
    assert all(0.0 <= u <= 100.0 for u in sampler.utilisation)
    assert summary.mean > 0.0  # kernels ran all the time


@CUDA
def test_on_cuda_torch_mlp_reports_utilisation_and_its_copies(tiny_task):
    cls = discover()["torch-mlp"][1]
    params = {**cls.test_parameters}
    measured = run_case(
        cls,
        tiny_task.cube,
        run_id="test",
        params=params,
        device="cuda",
        threads=2,
        environment=results.environment_manifest(2, 0),
        task=tiny_task,
    )
    result = measured.result
    assert result["status"] == "ok", result["reason"]
    results.validate(result)
    block = result["gpu"]
    assert set(block) >= GPU_KEYS
    assert block["name"] == torch.cuda.get_device_name(torch.cuda.current_device())
    if gpu.nvml_device() is not None:
        assert block["utilisation_samples"] > 0
        for key in ("utilisation_mean_pct", "utilisation_p10_pct"):
            assert 0.0 <= block[key] <= 100.0
        assert block["utilisation_p10_pct"] <= block["utilisation_mean_pct"]
    assert block["h2d_copy_s"] > 0.0 and block["h2d_note"] is None
    epochs = int(measured.case.params["epochs"])
    batch = int(measured.case.params["batch_size"])
    assert block["h2d_bytes"] == _training_bytes(tiny_task, batch, epochs)
    assert result["memory"]["gpu_peak_mb"] > 0.0
    json.dumps(result)  # plain JSON


@CUDA
def test_on_cuda_keras_mlp_says_why_its_copies_are_not_timed(tiny_task):
    tf = pytest.importorskip("tensorflow")
    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("TensorFlow sees no GPU")
    from cubebench.models.keras import COPY_NOTE

    cls = discover()["keras-mlp"][1]
    measured = run_case(
        cls,
        tiny_task.cube,
        run_id="test",
        params={**cls.test_parameters, "epochs": 1},
        device="cuda",
        threads=2,
        environment=results.environment_manifest(2, 0),
        task=tiny_task,
    )
    result = measured.result
    assert result["status"] == "ok", result["reason"]
    results.validate(result)
    assert result["gpu"]["h2d_copy_s"] is None and result["gpu"]["h2d_bytes"] is None
    assert result["gpu"]["h2d_note"] == COPY_NOTE and result["gpu"]["name"]
    assert result["memory"]["gpu_peak_mb"] > 0.0
