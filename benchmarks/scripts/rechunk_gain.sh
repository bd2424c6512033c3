#!/usr/bin/env bash
# What a rechunked copy buys the loader: `cubebench rechunk` a `ts` cube to balanced and map,
# then `bench-loader` on the original and on each copy. One JSON line per task and cube, with
# samples/s (pairs or windows) and its ratio to the ts original's; the copies are removed after.
#   bash benchmarks/scripts/rechunk_gain.sh [preset] [epochs] [task ...]
# e.g. bash benchmarks/scripts/rechunk_gain.sh small 3 lst-from-t2m lst-gapfill
set -euo pipefail
preset=${1:-small}
epochs=${2:-3}
shift $(($# < 2 ? $# : 2))
tasks=("${@:-lst-from-t2m}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src="synthetic:${preset}?layout=ts"
for layout in balanced map; do
  cubebench rechunk "$src" "$work/$layout.zarr" --layout "$layout" --json 2>/dev/null
done
for task in "${tasks[@]}"; do
  for cube in "$src" "$work/balanced.zarr" "$work/map.zarr"; do
    cubebench bench-loader --cube "$cube" --task "$task" --epochs "$epochs" --json 2>/dev/null
  done | python3 -c "
import json, sys
base = None
for line in sys.stdin:
    row = json.loads(line)
    items = 'windows' if row['geometry'] == 'patch' else 'pairs'
    rate = row[f'{items}_per_s']
    base = base or rate
    print(json.dumps({
        'task': '$task', 'chunk_shape': row['chunk_shape'],
        f'{items}_per_s': round(rate), 'vs_ts': round(rate / base, 2),
        f'raw_decode_{items}_per_s': round(row[f'raw_decode_{items}_per_s']),
        'read_amplification': row['read_amplification'], 'chunks_decoded': row['chunks_decoded'],
        **{k: row[k] for k in ('decoded_over_window_bytes',) if k in row},
        'peak_rss_mb': row['peak_rss_mb'],
    }))"
done
