#!/usr/bin/env bash
# Loader vs raw decode per layout and adapter, one JSON line each (bench-loader, same run).
#   bash benchmarks/loader_layouts.sh [preset] [epochs]
set -euo pipefail
preset=${1:-small}
epochs=${2:-3}
export TF_CPP_MIN_LOG_LEVEL=3
for layout in map ts balanced; do
  for adapter in numpy torch tf; do
    cubebench bench-loader --cube "synthetic:${preset}?layout=${layout}" --adapter "$adapter" \
      --epochs "$epochs" --json 2>/dev/null | python3 -c "
import json, sys
row = json.loads(sys.stdin.read())
keep = ('adapter', 'chunk_shape', 'reader', 'pairs', 'pairs_per_s', 'raw_decode_pairs_per_s',
        'raw_reader', 'raw_by_reader', 'ratio_to_raw', 'read_amplification', 'peak_rss_mb',
        'time_to_first_batch_s', 'stall_fraction')
print(json.dumps({'layout': '$layout', **{k: row[k] for k in keep}}))"
  done
done
