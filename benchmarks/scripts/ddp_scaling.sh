#!/usr/bin/env bash
# Training throughput of the torch DDP cases on 1 rank vs N ranks, in one run (the ranks share
# the thread budget: on N ranks each has THREADS/N threads).
#   bash benchmarks/scripts/ddp_scaling.sh [CUBE] [RANKS] [THREADS] [EPOCHS]
set -euo pipefail
cube=${1:-synthetic:small}
ranks=${2:-2}
threads=${3:-2}
epochs=${4:-2}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for n in 1 "$ranks"; do
    cubebench run --cube "$cube" --cases torch-mlp,torch-cnn --epochs "$epochs" \
        --threads "$threads" --nproc "$n" --no-tracking --out "$out" --run-id "nproc$n" >/dev/null
done
python - "$out" "$ranks" <<'PY'
import json
import sys
from pathlib import Path

out, ranks = Path(sys.argv[1]), sys.argv[2]
print("| case | ranks | threads/rank | steps/epoch | train samples/s | fit s | stall | RMSE [K] |")
print("|---|---|---|---|---|---|---|---|")
speed = {}
for n in ("1", ranks):
    for path in sorted((out / f"nproc{n}").glob("torch-*.json")):
        r = json.loads(path.read_text())
        if r["status"] != "ok":
            print(f"| {r['case']} | {n} | failed: {r['reason']} |")
            continue
        sps = r["throughput"]["train_samples_per_s"]
        speed[r["case"], n] = sps
        loading = r["loading"]
        stall = f"{loading['stall_fraction']:.1%} ± {loading['stall_ci95']:.1%}"
        steps = ", ".join(str(int(e["steps"])) for e in r["epochs"])  # every rank takes these
        print(
            f"| {r['case']} | {r.get('world_size', 1)} | {r['threads']} | {steps} | {sps:,.0f} "
            f"| {r['timing']['fit_s']:.1f} | {stall} | {r['metrics']['rmse']:.3f} |"
        )
for case in sorted({c for c, _ in speed}):
    if (case, "1") in speed and (case, ranks) in speed:
        print(f"{case}: {ranks} ranks / 1 rank = {speed[case, ranks] / speed[case, '1']:.2f}x")
PY
