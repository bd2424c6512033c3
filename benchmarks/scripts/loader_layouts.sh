#!/usr/bin/env bash
# Loader vs raw decode per layout and adapter, one JSON line each (bench-loader, same run).
#   bash benchmarks/scripts/loader_layouts.sh [preset] [epochs] [pixel|patch]
# patch: the 16 x 16 windows of lst-gapfill (items are windows, not pixel pairs).
set -euo pipefail
preset=${1:-small}
epochs=${2:-3}
geometry=${3:-pixel}
task=lst-from-t2m
[ "$geometry" = patch ] && task=lst-gapfill
export TF_CPP_MIN_LOG_LEVEL=3
for layout in map ts balanced; do
  for adapter in numpy torch tf; do
    cubebench bench-loader --cube "synthetic:${preset}?layout=${layout}" --task "$task" \
      --adapter "$adapter" --epochs "$epochs" --json 2>/dev/null | python3 -c "
import json, sys
row = json.loads(sys.stdin.read())
items = 'windows' if row['geometry'] == 'patch' else 'pairs'
keep = ('adapter', 'chunk_shape', 'reader', items, f'{items}_per_s', f'raw_decode_{items}_per_s',
        'raw_reader', 'raw_by_reader', 'ratio_to_raw', 'read_amplification', 'chunks_decoded',
        'decoded_over_window_bytes', 'peak_rss_mb', 'time_to_first_batch_s', 'stall_fraction')
print(json.dumps({'layout': '$layout', **{k: row[k] for k in keep if k in row}}))"
  done
done
