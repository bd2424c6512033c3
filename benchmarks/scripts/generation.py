"""Synthetic cube generation: wall time and peak RSS per preset, each in a fresh process.

    python benchmarks/scripts/generation.py [--presets small medium] [--chunks 46,90,90]
        [--layout balanced]

Peak RSS must not grow with the cube (memory is bounded by chunks): the script prints the
ratio of each preset's peak RSS to the first one's. The coastline mask is cached before timing
(it is computed once per grid, in a child process, and is not part of the streaming writer).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(preset: str, layout: str, output: Path) -> None:
    from cubebench.cube.synthetic import (
        PRESETS,
        build_dataset,
        cache_dir,
        land_mask,
        make_grid,
        write_cube,
    )

    _, lat, lon = make_grid(PRESETS[preset])
    land_mask(lat, lon, cache_dir())  # warm the per-grid cache outside the timed part
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    ds = build_dataset(preset=preset, layout=layout)
    write_cube(ds, output)
    seconds = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    decoded = sum(v.nbytes for v in ds.data_vars.values())
    print(
        json.dumps(
            {
                "preset": preset,
                "layout": layout,
                "seconds": round(seconds, 2),
                "decoded_mb": round(decoded / 1e6, 1),
                "stored_mb": round(stored / 1e6, 1),
                "decoded_mb_per_s": round(decoded / 1e6 / seconds, 1),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "rss_before_generation_mb": round(baseline, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small", "medium"])
    parser.add_argument("--layout", default="balanced", help="layout name or explicit t,y,x")
    parser.add_argument("--chunks", help="explicit chunk shape t,y,x (overrides --layout)")
    parser.add_argument(
        "--child", nargs=3, metavar=("PRESET", "LAYOUT", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], Path(args.child[2]))
        return
    layout = args.chunks or args.layout
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            out = Path(tmp) / f"{preset}.zarr"
            proc = subprocess.run(
                [sys.executable, __file__, "--child", preset, layout, str(out)],
                check=True,
                capture_output=True,
                text=True,
            )
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first = rows[0]["peak_rss_mb"]
    for row in rows:
        row["rss_ratio_to_first"] = round(row["peak_rss_mb"] / first, 3)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
