#!/usr/bin/env bash
# Is the loader figure stable? The same bench-loader command run N times in a row per adapter
# (the command: small cube, batch 4096, --epochs 5), and how far each run's
# ratio_to_raw lies from the median of the N (target: every run within ±15 %).
#   bash benchmarks/scripts/loader_stability.sh [runs] [adapters] [preset]
set -euo pipefail
runs=${1:-5}
adapters=${2:-numpy,torch,tf}
preset=${3:-small}
export TF_CPP_MIN_LOG_LEVEL=3
for adapter in ${adapters//,/ }; do
  for _ in $(seq "$runs"); do
    cubebench bench-loader --cube "synthetic:${preset}" --batch-size 4096 --epochs 5 \
      --adapter "$adapter" --json 2>/dev/null
  done | python3 -c "
import json, statistics, sys
rows = [json.loads(line) for line in sys.stdin]
ratios = [r['ratio_to_raw'] for r in rows]
median = statistics.median(ratios)
worst = max(abs(r / median - 1) for r in ratios)
runs = ', '.join(f\"{r['ratio_to_raw']:.2f} [{r['ratio_to_raw_ci95'][0]:.2f}-{r['ratio_to_raw_ci95'][1]:.2f}] x{r['epochs']}\" for r in rows)
print(f'$adapter: ratio_to_raw per run {runs}; median {median:.2f}, worst {worst:+.0%} '
      f'(loader {statistics.median(r[\"pairs_per_s\"] for r in rows) / 1e6:.1f} M pairs/s, '
      f'reference {statistics.median(r[\"raw_decode_pairs_per_s\"] for r in rows) / 1e6:.1f} M, '
      f'extracting reference {statistics.median(r[\"raw_extract_pairs_per_s\"] for r in rows) / 1e6:.1f} M)')
"
done
