"""The images' locks: the CUDA images run the CPU image's framework versions (a CPU-vs-GPU
comparison compares devices, not versions), each CUDA lock is complete and exact against the
index, and it holds one CUDA major version (no GPU here to run the images themselves)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA = ("cuda-torch", "cuda-tf")
# the package each image's framework comes as: the CPU image has CPU-only builds
FRAMEWORK = {"cuda-torch": {"torch": "torch"}, "cuda-tf": {"tensorflow-cpu": "tensorflow"}}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(flavour: str) -> dict[str, str]:
    """name -> version of an image's lock, local tags (`+cpu`) dropped."""
    text = (ROOT / "images" / flavour / "requirements.lock").read_text()
    found = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            found[canonical(name)] = version.strip().split("+")[0]
    return found


def cuda_majors(packages: dict[str, str]) -> set[str]:
    """The CUDA major versions a set of packages is built for: the `-cuNN` suffixes of NVIDIA's
    wheels and the major version of the CUDA runtime (CUDA 13's wheels drop the suffix)."""
    majors = {m.group(1) for n in packages if (m := re.match(r"nvidia-.*-cu(\d+)$", n))}
    for name in ("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu12", "cuda-toolkit"):
        if name in packages:
            majors.add(packages[name].split(".")[0])
    return majors


@pytest.mark.parametrize("flavour", CUDA)
def test_a_cuda_image_has_the_cpu_images_versions_of_everything_they_share(flavour):
    cpu, cuda = pins("cpu"), pins(flavour)
    for cpu_name, cuda_name in FRAMEWORK[flavour].items():
        assert cuda[cuda_name] == cpu[cpu_name], cuda_name
    for name in ("keras", "scikit-learn", "numpy", "xarray", "zarr", "dask"):
        if name in cuda:
            assert cuda[name] == cpu[name], name
    shared = set(cpu) & set(cuda)
    assert {n: (cpu[n], cuda[n]) for n in shared if cpu[n] != cuda[n]} == {}
    assert "scikit-learn" in cuda and "mlflow" in cuda  # sklearn cases and tracking run there


def test_each_framework_is_in_its_own_cuda_image():
    torch_image, tf_image = pins("cuda-torch"), pins("cuda-tf")
    assert "torch" in torch_image and "tensorflow" not in torch_image
    assert "tensorflow" in tf_image and "keras" in tf_image and "torch" not in tf_image
    assert "xgboost" in tf_image  # XGBoost's GPU build asks for NCCL on CUDA 12, as tf does
    assert cuda_majors(torch_image) == {"13"} and cuda_majors(tf_image) == {"12"}


@pytest.mark.slow  # resolves against PyPI: a minute or two per lock
@pytest.mark.parametrize("flavour", CUDA)
def test_a_cuda_lock_is_complete_and_exact_with_one_cuda_stack(flavour):
    """pip resolves the lock with its dependencies against the index (nothing is installed):
    it adds and changes nothing, and every NVIDIA library is for one CUDA major version."""
    lock = ROOT / "images" / flavour / "requirements.lock"
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", "-", "-r", str(lock)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    resolved = {
        canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]
    }
    assert resolved == pins(flavour)
    assert len(cuda_majors(resolved)) == 1, cuda_majors(resolved)


def test_cuda_majors_sees_both_naming_styles():
    assert cuda_majors({"nvidia-cublas-cu12": "12.9.3", "nvidia-cuda-runtime-cu12": "12.9.79"}) == {
        "12"
    }
    assert cuda_majors({"nvidia-cudnn-cu13": "9.2", "nvidia-cuda-runtime": "13.0.96"}) == {"13"}
    assert cuda_majors({"nvidia-cudnn-cu13": "9.2", "nvidia-cuda-runtime-cu12": "12.8"}) == {
        "12",
        "13",
    }
