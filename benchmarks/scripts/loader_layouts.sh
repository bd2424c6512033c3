#!/usr/bin/env bash
# Loader vs raw decode per layout, split kind and adapter, measured in one run: one JSON line
# each (bench-loader), then a markdown table of them.
#   bash benchmarks/scripts/loader_layouts.sh [preset] [epochs] [pixel|patch] [adapters] [splits]
# epochs: the fewest measured (reference, loader) pairs; more until the ratio's 95 % interval
# is within ±10 % (bench-loader --max-seconds, 30 s).
# adapters: comma-separated (default numpy); splits: comma-separated --split values (default
# blocks,time,chunks: physical blocks, time periods in the task's fractions, whole chunks;
# `task`: the task's own split).
# patch: the 16 x 16 windows of lst-gapfill (items are windows, not pixel pairs).
set -euo pipefail
preset=${1:-small}
epochs=${2:-3}
geometry=${3:-pixel}
adapters=${4:-numpy}
splits=${5:-blocks,time,chunks}
task=lst-from-t2m
[ "$geometry" = patch ] && task=lst-gapfill
export TF_CPP_MIN_LOG_LEVEL=3
rows=$(mktemp)
trap 'rm -f "$rows"' EXIT
for layout in map ts balanced; do
  for split in ${splits//,/ }; do
    for adapter in ${adapters//,/ }; do
      split_args=(--split "$split")
      [ "$split" = task ] && split_args=()
      cubebench bench-loader --cube "synthetic:${preset}?layout=${layout}" --task "$task" \
        "${split_args[@]}" --adapter "$adapter" --epochs "$epochs" --json 2>/dev/null | python3 -c "
import json, sys
row = json.loads(sys.stdin.read())
items = 'windows' if row['geometry'] == 'patch' else 'pairs'
keep = ('adapter', 'chunk_shape', 'reader', 'epochs', items, f'{items}_per_s',
        f'raw_decode_{items}_per_s', f'raw_extract_{items}_per_s', 'raw_reader', 'raw_by_reader',
        'ratio_to_raw', 'ratio_to_raw_ci95', 'read_amplification', 'chunks_decoded',
        'decoded_over_window_bytes', 'peak_rss_mb', 'time_to_first_batch_s', 'stall_fraction')
print(json.dumps({'layout': '$layout', 'split': '$split',
                  **{k: row[k] for k in keep if k in row}}))" | tee -a "$rows"
    done
  done
done
python3 - "$rows" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
items = 'windows' if 'windows' in rows[0] else 'pairs'
print(f"\n| layout | split | adapter | {items}/s | reference /s | ratio to reference [95 %] | "
      "read amplification | chunks decoded / epoch |")
print("|---|---|---|---:|---:|---:|---:|---:|")
for r in rows:
    low, high = r['ratio_to_raw_ci95'] or (float('nan'), float('nan'))
    print(f"| {r['layout']} | {r['split']} | {r['adapter']} | {r[items + '_per_s']:,.0f} | "
          f"{r['raw_decode_' + items + '_per_s']:,.0f} | "
          f"{r['ratio_to_raw']:.2f} [{low:.2f}, {high:.2f}] | {r['read_amplification']:.2f} | "
          f"{r['chunks_decoded'] / r['epochs']:.0f} |")
EOF
