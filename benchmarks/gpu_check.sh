#!/usr/bin/env bash
# The prepared GPU check (issue 24, item 4), in one command, on a machine with one NVIDIA GPU,
# no network and no Docker:
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# 1. install (with WHEELS=DIR only): cubebench and the dependencies the machine lacks, offline;
# 2. probe: torch, its CUDA build and whether it sees a GPU (OUT_DIR/torch_env.json);
# 3. make-cube: the `small` synthetic cube (into $CUBEBENCH_CACHE, or the user cache);
# 4. the "cuda" pass: torch-mlp, torch-transfer, torch-cnn with `cubebench run --device cuda
#    --no-tracking --threads THREADS` (OUT_DIR/runs/cuda);
# 5. the "cpu" pass: the same three with --device cpu and the same threads (OUT_DIR/runs/cpu);
# 6. the loader: `cubebench bench-loader --threads 1,2,4,8,16 --emulate-rate sweep --json`
#    (torch adapter; the sweep takes the numpy or torch adapter, not tf; OUT_DIR/loader.jsonl);
# 7. the summary, OUT_DIR/gpu_check.json (benchmarks/scripts/gpu_summary.py, which reads the
#    run directories with cubebench.results.load_run): per case the cuda and cpu samples/s and
#    their ratio, fit seconds, stall, test RMSE and the cuda results' "gpu" block; the GPU,
#    driver, torch and CUDA; the loader's rows per thread count with their sweeps; each step's
#    exit status and wall seconds, and the total.
# Every step's output is in OUT_DIR/logs/STEP.log. The check exits 1 when a step or a case
# failed (the summary is written all the same), 2 on a bad argument (one line on stderr).
#
# Environment:
#   WHEELS=DIR       install first: python3 -m pip install --no-index --find-links DIR .
#                    (pip builds cubebench in an isolated environment from setuptools, wheel and
#                    packaging in DIR; where the resolving install fails, e.g. on a package of the
#                    machine older than a wheel needs, it installs DIR's wheels of packages the
#                    machine lacks with --no-deps, then cubebench with --no-build-isolation)
#   PYTHON           the interpreter (default python3); cubebench runs as `$PYTHON -m cubebench`
#   THREADS          threads of every case, and the loader's largest count (default: the CPU
#                    count, at most 16)
#   CPU_ONLY=1       without a GPU (the tests): the `tiny` cube, 1 epoch, the loader at 1 and 2
#                    threads; the "cuda" pass runs with --device cpu (the summary says so), so the
#                    same path runs
#   EPOCHS           epochs of every case (default 2; 1 with CPU_ONLY)
#   BUDGET_S         the whole check's limit in seconds: each step's timeout is the smaller of
#                    its own cap and what is left of it (default 450; 900 with CPU_ONLY)
#   LOADER_ADAPTER   numpy or torch (default torch)
#
# Filling WHEELS, on a machine with network (Python 3.12, manylinux x86-64; 30 wheels, 37 MB by
# `du -sh` on 2026-12-03). The packages the GPU machine lacks (the device's KINDS.md, "Python
# packages already there"), pinned to the versions the dev venv tests pass with (resolved
# together: aiobotocore takes botocore<1.43.118, distributed the same dask, s3fs the same
# fsspec); plus setuptools, wheel and packaging for pip's isolated build, and fsspec (s3fs pins
# its own version), aiohttp (aiobotocore needs >=3.14) and xarray (cubebench needs >=2025.1),
# which pip takes only where the machine's own version is too old:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d gpuwheels \
#     aiobotocore==3.10.0 aiohttp==3.14.5 aioitertools==0.13.0 botocore==1.43.117 \
#     cftime==1.6.6.1 dask==2026.8.0 distributed==2026.8.0 donfig==0.8.1.post1 \
#     fsspec==2026.9.0 global-land-mask==1.0.0 google-crc32c==1.9.0 h5netcdf==1.8.3 \
#     jmespath==1.1.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 locket==1.0.0 \
#     numcodecs==0.16.6 packaging==26.4 partd==1.4.2 platformdirs==4.14.9 referencing==0.37.0 \
#     rpds-py==2026.9.1 s3fs==2026.9.0 setuptools==84.2.1 tblib==3.2.2 tornado==6.6.1 \
#     wheel==0.48.0 xarray==2026.9.0 zarr==3.1.6 zict==3.0.0
#
# On the device tool: copy the folder into an ignored folder of the checkout (`echo /.whl/ >>
# .git/info/exclude`), carry it, and run `WHEELS=.whl bash benchmarks/gpu_check.sh
# $OUT/check` (the summary, $OUT/check/gpu_check.json, comes back; the runs are too deep).
#
# Time: under 8 minutes on the H200 machine (16 cores), by construction and by estimate.
# By construction: every step runs under `timeout` (its process group gets SIGTERM, then
# SIGKILL 15 s later), limited to the smaller of its own cap and what is left of BUDGET_S
# (450 s) less 20 s kept for the summary (a few seconds); each case gets half its pass
# (`cubebench run --timeout`); a step the budget no longer allows is skipped, and fails the check.
# The estimate, about 4 1/2 minutes (280 s), from timings on this 2-core machine, other work
# beside it, and README's figures:
#   install ~45 s: 11 s here (30 wheels, the isolated setuptools build of cubebench, a Python
#     3.12 venv holding the machine's other packages), a margin for a slower pip and disk;
#   probe ~10 s (2.3 s here; importing torch with CUDA, a CUDA context);
#   make-cube small ~15 s (16.5 s here from an empty cache, 1.4 s when cached);
#   the cuda pass ~60 s: here each case's process spends ~6 s outside the fit (start, imports,
#     task preparation 1-2 s, warm-up ~3 s, evaluation) and the suite ~17 s in its preflight
#     and report; README: torch-mlp on an H100 trained at 1.04 M samples/s, so its 2 epochs
#     (3.5 M samples) take ~3.5 s; torch-transfer's (1.7 M samples, then its short
#     fine-tuning epochs) and torch-cnn's (2 x 523 steps of 32 windows, a few ms a step)
#     ~5 s each; + ~5 s of CUDA start per case;
#   the cpu pass ~75 s: here, with 2 threads and 2 epochs on `small`, it took 89 s (torch-mlp
#     13 s, torch-transfer 12 s, torch-cnn 47 s of which 35 s fit); assumed: 16 threads cut
#     torch-cnn's fit 2-4x (not measured: this machine has 2 cores);
#   the loader ~75 s: here 30 s for 1 and 2 threads on `small` (at most 8 s of
#     (reference, loader) pairs each, then a sweep of 8 one-epoch probes), so ~15 s per count
#     for 5 counts.
# CPU_ONLY=1 (tiny cube, 2 cores shared with other work): 78 s to 147 s here.

set -uo pipefail

usage="usage: bash benchmarks/gpu_check.sh OUT_DIR (env: WHEELS, PYTHON, THREADS, CPU_ONLY=1, EPOCHS, BUDGET_S, LOADER_ADAPTER)"
die() {
    echo "gpu_check.sh: error: $* ($usage)" >&2
    exit 2
}
case "${1-}" in
-h | --help)
    echo "$usage"
    exit 0
    ;;
esac
[[ $# -eq 1 && -n ${1-} ]] || die "expected one argument, the output folder OUT_DIR, got $#"
[[ $1 != -* ]] || die "unknown option $1"

now() { date +%s.%N; }
started=$(now)
is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

cpu_only=${CPU_ONLY:-0}
[[ $cpu_only == 0 || $cpu_only == 1 ]] || die "CPU_ONLY is 0 or 1, got $cpu_only"
if [[ $cpu_only == 1 ]]; then
    preset=tiny epochs=${EPOCHS:-1} budget=${BUDGET_S:-900} loader_cap=2 max_seconds=2
    cuda_device=cpu pass_cap=400 loader_limit=300
else
    preset=small epochs=${EPOCHS:-2} budget=${BUDGET_S:-450} loader_cap=16 max_seconds=8
    cuda_device=cuda pass_cap=180 loader_limit=150
fi
cpus=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
threads=${THREADS:-$((cpus < 16 ? cpus : 16))}
adapter=${LOADER_ADAPTER:-torch}
is_count "$threads" || die "THREADS is a whole number above 0, got $threads"
is_count "$epochs" || die "EPOCHS is a whole number above 0, got $epochs"
is_count "$budget" || die "BUDGET_S is a whole number of seconds above 0, got $budget"
[[ $adapter == numpy || $adapter == torch ]] || die "LOADER_ADAPTER is numpy or torch (the sweep's), got $adapter"
py=${PYTHON:-python3}
command -v "$py" >/dev/null || die "no interpreter $py (set PYTHON)"
if [[ -n ${WHEELS-} ]]; then
    wheels=$(cd "$WHEELS" 2>/dev/null && pwd) || die "WHEELS=$WHEELS is not a folder"
    WHEELS=$wheels
fi
mkdir -p "$1" 2>/dev/null || die "cannot create $1"
out=$(cd "$1" && pwd) || die "cannot enter $1"
if [[ -e $out/runs || -e $out/gpu_check.json ]]; then
    die "$out already holds a check: give a new folder"
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || die "cannot find the repository"
cd "$repo" || die "cannot enter $repo"
loader_threads=""
for n in 1 2 4 8 16; do
    if ((n <= threads && n <= loader_cap)); then loader_threads+=${loader_threads:+,}$n; fi
done
cube="synthetic:$preset"
cases=torch-mlp,torch-transfer,torch-cnn
reserve=20 # seconds of the budget kept for the summary

mkdir -p "$out/logs" || die "cannot write in $out"
: >"$out/steps.tsv"
export PYTHONUNBUFFERED=1
export CUBEBENCH_CASES_DIR=${CUBEBENCH_CASES_DIR:-$repo/cases} # also when installed, not editable

# bounded LIMIT CMD...: CMD, stopped (with its process group) after LIMIT seconds
bounded() {
    local limit=$1
    shift
    if command -v timeout >/dev/null; then
        timeout --kill-after=15 "$limit" "$@"
    else
        "$@"
    fi
}

# limit_for CAP: the smaller of CAP and what the budget has left, less the summary's reserve
limit_for() {
    local left=$((budget - SECONDS - reserve))
    echo $(($1 < left ? $1 : left))
}

# step NAME LIMIT STDOUT CMD...: CMD under LIMIT seconds, its output in logs/NAME.log (its
# standard output in STDOUT instead, unless STDOUT is -); one line in steps.tsv
step() {
    local name=$1 limit=$2 stdout=$3 start rc
    shift 3
    start=$(now)
    if ((limit < 10)); then
        printf '%s\tskipped\t%s\t%s\t%s\n' "$name" "$start" "$start" "$limit" >>"$out/steps.tsv"
        echo "gpu_check: $name: skipped, the budget of ${budget} s is spent" >&2
        return 1
    fi
    echo "gpu_check: $name (at most ${limit} s)"
    if [[ $stdout == - ]]; then
        bounded "$limit" "$@" >"$out/logs/$name.log" 2>&1
    else
        bounded "$limit" "$@" >"$stdout" 2>"$out/logs/$name.log"
    fi
    rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$start" "$(now)" "$limit" >>"$out/steps.tsv"
    ((rc == 0)) || echo "gpu_check: $name: exit status $rc, see $out/logs/$name.log" >&2
    return "$rc"
}

# the install of WHEELS (a function, so that `timeout` can bound it through bash -c)
# shellcheck disable=SC2317 # called through `bash -c install_wheels`
install_wheels() {
    "$py" -m pip install --no-index --find-links "$WHEELS" --no-cache-dir \
        --disable-pip-version-check "$repo" && return 0
    echo "gpu_check: the resolving install failed: installing with --no-deps" >&2
    local missing
    missing=$("$py" - "$WHEELS" <<'PY'
import sys
from importlib import metadata
from pathlib import Path

for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    try:
        metadata.version(wheel.name.split("-")[0])
    except metadata.PackageNotFoundError:
        print(wheel)
PY
    ) || return 1
    if [[ -n $missing ]]; then
        # shellcheck disable=SC2086 # one path a line, no spaces in wheel names
        "$py" -m pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check \
            $missing || return 1
    fi
    "$py" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir \
        --disable-pip-version-check "$repo"
}

cubebench=("$py" -m cubebench)
if [[ -n ${WHEELS-} ]]; then
    export WHEELS py repo
    export -f install_wheels
    step install "$(limit_for 240)" - bash -c install_wheels
fi
if step probe "$(limit_for 120)" - "$py" benchmarks/scripts/gpu_summary.py probe "$out"; then
    step make-cube "$(limit_for 180)" "$out/make_cube.json" \
        "${cubebench[@]}" make-cube --preset "$preset" --json
    for pass in cuda cpu; do
        device=$([[ $pass == cuda ]] && echo "$cuda_device" || echo cpu)
        limit=$(limit_for "$pass_cap")
        # half the pass a case: one that hangs leaves the others time, and never the budget
        case_timeout=$((limit / 2 > 10 ? limit / 2 : 10))
        step "run-$pass" "$limit" - "${cubebench[@]}" run --cube "$cube" --cases "$cases" \
            --device "$device" --no-tracking --threads "$threads" --epochs "$epochs" \
            --timeout "$case_timeout" --out "$out/runs" --run-id "$pass"
    done
    step bench-loader "$(limit_for "$loader_limit")" "$out/loader.jsonl" \
        "${cubebench[@]}" bench-loader --cube "$cube" --adapter "$adapter" \
        --threads "$loader_threads" --emulate-rate sweep --epochs 2 \
        --max-seconds "$max_seconds" --json
fi

summary_flags=()
[[ $cpu_only == 1 ]] && summary_flags+=(--cpu-only)
bounded 60 "$py" benchmarks/scripts/gpu_summary.py summary "$out" --cube "$cube" \
    --epochs "$epochs" --threads "$threads" --loader-threads "$loader_threads" \
    --loader-adapter "$adapter" --budget-s "$budget" --started "$started" \
    --wheels "${WHEELS-}" "${summary_flags[@]}"
rc=$?
if [[ -f $out/gpu_check.json ]]; then
    echo "gpu_check: summary in $out/gpu_check.json ($SECONDS s in all, exit status $rc)"
else
    echo "gpu_check: no summary written (exit status $rc)" >&2
    ((rc != 0)) || rc=1
fi
exit "$rc"
