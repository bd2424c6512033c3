"""`cubebench` command line. User mistakes end with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from cubebench import interrupts
from cubebench.errors import CubebenchError
from cubebench.redact import scrub

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # as a shell reports a process ended by SIGINT


def _storage_options(pairs: list[str]) -> dict | None:
    """`KEY=VALUE` pairs for fsspec; true/false/ints become Python values."""
    if not pairs:
        return None
    options: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CubebenchError(f"--storage-option takes KEY=VALUE, got {pair!r}")
        lowered = value.lower()
        if lowered in ("true", "false"):
            options[key] = lowered == "true"
        elif value.isascii() and value.isdigit():  # not "²": isdigit, yet int() refuses it
            options[key] = int(value)
        else:
            options[key] = value
    return options


def _positive_list(kind):
    """An argparse type: comma-separated numbers of `kind` above zero."""
    one = _positive(kind)

    def parse(text: str) -> list:
        return [one(part) for part in text.split(",")]

    parse.__name__ = f"list of positive {kind.__name__}"
    return parse


def _non_negative(kind):
    """An argparse type: a finite number of `kind`, zero or more."""
    return _finite(kind, zero=True)


def _rate_or_sweep(text: str) -> float | str:
    return "sweep" if text == "sweep" else _positive(float)(text)


def _positive(kind):
    """An argparse type: a number of `kind` greater than zero."""
    return _finite(kind, zero=False)


def _finite(kind, zero: bool):
    """An argparse type: a finite number of `kind` above 0, or from 0 on with `zero`."""
    bound = ">= 0" if zero else "above 0"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        above = value >= 0 if zero else value > 0  # False for NaN
        if not (above and value < float("inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
        return value

    parse.__name__ = f"{'non-negative' if zero else 'positive'} {kind.__name__}"
    return parse


def _add_cube_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cube",
        default="synthetic:small",
        help="synthetic:<preset>[?layout=..&seed=..&format=..&profile=..], a Zarr/NetCDF path "
        "or a remote URL (s3://, https://) (default: %(default)s)",
    )
    _add_storage_option_arg(p)


def _add_split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--split",
        metavar="KIND[:...]",
        help="blocks:46d,10deg (days or steps 't' x degrees or 'px'), time:END_TRAIN,END_VAL, "
        "region[:GRID] (the transfer task's), or chunks[:T,Y,X] (whole storage chunks: "
        "the parts then change with the layout) (default: the task's)",
    )
    p.add_argument(
        "--buffer",
        type=_non_negative_int,
        metavar="N",
        help="leave out the blocks within N blocks of a later part's (train gives way to val "
        "and test, val to test; a time split counts time steps)",
    )


def _add_task_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--task",
        default=default,
        metavar="NAME|PATH",
        help="a built-in task (`cubebench tasks`) or a task file (.toml)"
        + (f" (default: {default})" if default else " (default: each case's own)"),
    )
    p.add_argument("--inputs", type=_names, metavar="VAR[,VAR...]", help="the task's inputs")
    p.add_argument("--target", metavar="VAR", help="the task's target variable")


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one variable name")
    return names


def _task_choice(args: argparse.Namespace) -> dict | None:
    """The command line's task: `--task` (its file's text kept, so that the run is
    self-contained), `--inputs`, `--target`; None when none is given."""
    from cubebench.taskfiles import builtin_files, load_task

    if not (args.task or args.inputs or args.target):
        return None
    choice: dict = {"task": args.task, "toml": None, "inputs": args.inputs, "target": args.target}
    if args.task:
        _, text = load_task(args.task)
        if args.task not in builtin_files():
            choice.update(task=str(Path(args.task).resolve()), toml=text)
    return choice


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _add_storage_option_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option for remote cubes, e.g. anon=true or endpoint_url=http://127.0.0.1:9000",
    )


def _add_dask_scheduler_arg(p: argparse.ArgumentParser, what: str, default: str = "") -> None:
    p.add_argument(
        "--dask-scheduler",
        metavar="ADDRESS|local[:N]",
        help=f"{what} on a dask.distributed cluster: a scheduler address (its workers must see "
        f"the same paths), or local[:N] for a LocalCluster of N worker processes{default}",
    )


def _cmd_make_cube(args: argparse.Namespace) -> int:
    from cubebench.cube import make_cube
    from cubebench.cube.synthetic import PRESETS, layout_chunks

    layout = args.chunks or args.layout
    layout_chunks(layout, PRESETS[args.preset].shape)  # a bad layout fails before any work
    start = time.perf_counter()
    path = make_cube(
        preset=args.preset,
        seed=args.seed,
        layout=layout,
        zarr_format=args.format,
        profile=args.profile,
        output=args.output,
        overwrite=args.force,
        scheduler=args.dask_scheduler,
    )
    elapsed = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    info = {"path": str(path), "seconds": round(elapsed, 3), "stored_mb": round(stored / 1e6, 3)}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"cube written to {path} ({info['stored_mb']} MB on disk, {elapsed:.1f} s)")
    return 0


def _cmd_rechunk(args: argparse.Namespace) -> int:
    from cubebench.cube.rechunk import rechunk_cube

    result = rechunk_cube(
        args.src,
        args.dst,
        args.layout,
        scheduler=args.dask_scheduler,
        storage_options=_storage_options(args.storage_option),
        force=args.force,
    )
    info = result.summary()
    if args.json:
        print(json.dumps(info))
    else:
        peak = info["peak_worker_rss_mb"]
        memory = f", workers' peak RSS {peak:.0f} MB" if peak is not None else ""
        print(
            f"{info['dst']}: chunks {' x '.join(map(str, info['chunks']))} "
            f"({info['seconds']:.1f} s{memory})"
        )
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from cubebench.cube import open_cube
    from cubebench.task import (
        Box,
        parse_fractions,
        parse_time_range,
        prepare_task,
        task_for,
        with_split,
    )

    spec = task_for(
        args.task,
        _task_choice(args),
        seed=args.seed,
        region=Box.parse(args.region) if args.region else None,
        time_range=parse_time_range(args.time) if args.time else None,
        fractions=parse_fractions(args.fractions) if args.fractions else None,
    )
    spec = with_split(spec, args.split, args.buffer)
    started = time.perf_counter()
    cube = open_cube(args.cube, storage_options=_storage_options(args.storage_option))
    prepared = prepare_task(spec, cube, scheduler=args.dask_scheduler)
    summary = prepared.summary() | {"prepare_seconds": round(time.perf_counter() - started, 3)}
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0


def _cmd_bench_loader(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cubebench.cube import open_cube
    from cubebench.loading.bench import bench_loader, emulate, sweep
    from cubebench.task import prepare_task, task_for, with_split
    from cubebench.windows import Patch

    options = _storage_options(args.storage_option)
    spec = with_split(task_for(args.task, _task_choice(args)), args.split, args.buffer)
    if args.patch and args.geometry == "pixel":
        raise CubebenchError("--patch sets windows: it does not go with --geometry pixel")
    if args.patch:
        spec = replace(spec, patch=Patch.parse(args.patch))
    elif args.geometry:  # the task's own windows, or the default ones
        spec = replace(spec, patch=(spec.patch or Patch()) if args.geometry == "patch" else None)
    cube = open_cube(args.cube, storage_options=options)
    task = prepare_task(spec, cube)
    if args.part not in task.blocks:
        raise CubebenchError(f"unknown part {args.part!r}; parts: {', '.join(task.blocks)}")
    settings = {
        "part": args.part,
        "batch_size": args.batch_size or (4096 if spec.patch is None else 32),
        "adapter": args.adapter,
        "epochs": args.epochs,
        "buffer_chunks": args.buffer_chunks,
        "reader": args.reader,
        "storage_options": options,
    }
    if args.emulate_rate is not None and args.adapter == "tf":
        raise CubebenchError(
            "--emulate-rate needs the numpy or torch adapter (tf consumes in a graph)"
        )
    if args.emulate_rate is not None and args.workers:
        raise CubebenchError("--emulate-rate goes without --workers")
    for threads in args.threads:
        row = bench_loader(
            task, threads=threads, workers=args.workers, max_seconds=args.max_seconds, **settings
        )
        if args.emulate_rate == "sweep":
            found = sweep(task, threads=threads, **settings)
            row |= {"sustained_rate_at_90": found["sustained_rate_at_90"], "sweep": found}
        elif args.emulate_rate is not None:
            row |= emulate(task, args.emulate_rate, threads=threads, **settings)
        if args.json:
            print(json.dumps(row), flush=True)
        elif len(args.threads) == 1:
            _print_summary(row)
        else:
            _print_scaling_line(row)
    return 0


def _print_scaling_line(row: dict) -> None:
    """One line of `bench-loader --threads a,b,...`."""
    items = "windows" if row["geometry"] == "patch" else "pairs"
    low_high = row["ratio_to_raw_ci95"] or [float("nan")] * 2
    line = (
        f"threads {row['threads']:>3}  {items}/s {row[f'{items}_per_s']:>12,.0f}  "
        f"reference {row[f'raw_decode_{items}_per_s']:>12,.0f}  ratio {row['ratio_to_raw']:.2f} "
        f"[{low_high[0]:.2f}, {low_high[1]:.2f}]"
    )
    if "sustained_rate_at_90" in row:
        line += f"  at 90% AU {row['sustained_rate_at_90'] or 0:,.0f}/s"
    elif "accelerator_utilisation" in row:
        line += f"  AU {row['accelerator_utilisation']:.2f} at {row['rate']:,.0f}/s"
    print(line, flush=True)


def _cmd_tasks(args: argparse.Namespace) -> int:
    from cubebench.taskfiles import builtin_files, load_task

    rows = []
    for name, path in sorted(builtin_files().items()):
        spec, _ = load_task(name)
        rows.append(
            {
                "task": name,
                "inputs": ",".join(spec.inputs),
                "target": spec.target,
                "samples": "pixels" if spec.patch is None else "windows",
                "split": str(spec.split),
                "file": str(path),
            }
        )
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        print("  ".join(str(v) for v in row.values()))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from cubebench.discovery import discover

    cases = discover(args.cases_dir)
    rows = [
        (name, cls.library, cls.task, ",".join(cls.devices), _params(cls.parameters))
        for name, (_, cls) in cases.items()
    ]
    if args.json:
        keys = ("case", "library", "task", "devices", "parameters")
        print(json.dumps([dict(zip(keys, row)) for row in rows]))
        return 0
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)] if rows else [0] * 4
    for row in rows:
        print("  ".join(f"{v!s:<{w}}" for v, w in zip(row[:4], widths)) + "  " + row[4])
    return 0


def _params(parameters: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in parameters.items())


# what `run --resume` takes from the run's manifest instead of the command line
RUN_SETTINGS = (
    "cube",
    "cases",
    "device",
    "epochs",
    "seed",
    "threads",
    "timeout",
    "nproc",
    "repeat",
    "vary_split",
    "split",
    "buffer",
    "param",
    "task",
    "inputs",
    "target",
    "run_id",
)


def _cmd_run(args: argparse.Namespace) -> int:
    from cubebench.cube import open_cube
    from cubebench.discovery import discover
    from cubebench.progress import SuiteProgress
    from cubebench.report import write_report
    from cubebench.runner import (
        claim_run_dir,
        hold_run,
        jobs,
        join_run_dir,
        run_suite,
        variants_of,
    )
    from cubebench.task import task_for
    from cubebench.tracking import SuiteTracker

    available = discover(args.cases_dir)
    options = _storage_options(args.storage_option)
    settings = _run_settings(args, available)
    names = list(variants_of(settings["cases"], available, settings["params"]))  # bad --param
    cube = open_cube(settings["cube"], storage_options=options)  # a bad cube fails here
    splits = range(settings["repeat"]) if settings["vary_split"] else range(1)
    tasks = [task_for(available[c][1].task, settings["task_choice"]) for c in settings["cases"]]
    _preflight(cube, tasks, splits, settings["split"], settings["buffer"])
    if args.cases == "all":
        for case, why in _unfit(available, list(available), args).items():
            print(f"not run: {case}: {why}", file=sys.stderr)
    if args.join:
        run_dir = join_run_dir(args.out, args.join)
        again = "run the same command again (--join skips the cases with a result)"
    elif args.resume:
        run_dir = Path(args.out) / args.resume
    else:
        run_dir = claim_run_dir(args.out, args.run_id)
    if not args.join:
        again = f"resume with `cubebench run --resume {run_dir.name} --out {args.out}`"
    tracker = None if args.no_tracking else SuiteTracker(run_dir, args.experiment)
    try:
        with (
            hold_run(run_dir, wait=bool(args.join)),
            SuiteProgress(jobs(names, settings["repeat"])) as progress,
        ):
            if tracker:
                tracker.warn_with(progress.warn)
            outcomes = run_suite(
                **settings,
                available=available,
                run_dir=run_dir,
                storage_options=options,
                progress=progress,
                tracker=tracker,
                resume=bool(args.resume),
                join=bool(args.join),
            )
        paths = write_report(run_dir)
    except KeyboardInterrupt:
        print(
            f"cubebench: interrupted; finished cases are kept in {run_dir}: {again}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except OSError as error:  # disk full, results root gone read-only...
        raise CubebenchError(
            f"cannot write results in {run_dir}: {error.strerror or error}; finished cases are "
            f"intact: free space, then {again}"
        ) from None
    if tracker:
        tracker.finish(resumed=bool(args.resume))
    for change in _resume_changes(run_dir):
        print(
            f"warning: resumed with another {change} than the first cases ran with", file=sys.stderr
        )
    failed = [o for o in outcomes if o.status != "ok"]
    print(f"results: {run_dir}")
    print(f"report:  {next((p for p in paths if p.suffix == '.md'), run_dir)}")
    if tracker:
        line, warning = tracker.summary(names)
        print(line, file=sys.stderr if warning else sys.stdout)
    for outcome in failed:
        print(f"failed:  {outcome.name}: {outcome.reason}", file=sys.stderr)
    return 1 if failed else 0


def _run_settings(args: argparse.Namespace, available: dict) -> dict:
    """What `run_suite` runs: the command line's settings, or with `--resume` the resumed
    run's (given together with other settings, they are a mistake: one line)."""
    from cubebench.discovery import select
    from cubebench.runner import resume_settings

    if args.join and (args.resume or args.run_id):
        raise CubebenchError("--join names the run itself: drop --resume and --run-id")
    if not args.resume:
        return {
            "cube": args.cube,
            "cases": _fitting(available, select(available, args.cases), args),
            "device": args.device,
            "epochs": args.epochs,
            "seed": args.seed,
            "threads": args.threads,
            "timeout": args.timeout,
            "nproc": args.nproc,
            "repeat": args.repeat,
            "vary_split": args.vary_split,
            "split": args.split,
            "buffer": args.buffer,
            "params": args.param or [],
            "task_choice": _task_choice(args),
        }
    defaults = vars(build_parser().parse_args(["run"]))
    given = [k for k in RUN_SETTINGS if getattr(args, k) != defaults[k]]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise CubebenchError(f"--resume takes the settings of the run it resumes; drop {flags}")
    settings = resume_settings(args.out, args.resume)
    select(available, ",".join(settings["cases"]))  # every case file is still there
    return settings


def _unfit(available: dict, cases: list[str], args: argparse.Namespace) -> dict[str, str]:
    """With `--task`, the selected cases that cannot solve it, with the reason."""
    from cubebench.task import task_for

    choice = _task_choice(args)
    if not choice or not choice["task"] or args.resume:
        return {}
    spec = task_for(choice["task"], choice)
    return {c: f"it {why} ({spec.name})" for c in cases if (why := available[c][1].fits(spec))}


def _fitting(available: dict, cases: list[str], args: argparse.Namespace) -> list[str]:
    """With `--task`, the selected cases that can solve it (with `--cases all` the others are
    left out, and listed once the task is known to be good); named ones that cannot are a
    mistake (one line)."""
    unfit = _unfit(available, cases, args)
    if unfit and args.cases != "all":
        case, why = next(iter(unfit.items()))
        raise CubebenchError(f"case {case} cannot run the task: {why}")
    fitting = [c for c in cases if c not in unfit]
    if not fitting:
        raise CubebenchError(f"no case can run the task: {next(iter(unfit.values()))}")
    return fitting


def _preflight(
    cube,
    tasks: list,
    splits: range = range(1),
    split: str | None = None,
    buffer: int | None = None,
) -> None:
    """Prepare every task (TaskSpec) once (with every split seed the repeats will use) before
    any case starts: a variable the cube lacks, a region without valid samples or too few
    blocks for a split, a date outside the cube is one line now, not the same failure in every
    case. An unreadable chunk and other problems are left to the cases that meet them (each
    says which)."""
    from dataclasses import replace

    from cubebench.errors import ChunkReadError
    from cubebench.task import prepare_task, with_split

    for spec in sorted(dict.fromkeys(tasks), key=lambda spec: spec.name):
        for offset in splits:
            try:
                chosen = with_split(replace(spec, seed=spec.seed + offset), split, buffer)
                prepare_task(chosen, cube)
            except ChunkReadError:
                pass
            except CubebenchError as error:
                seed = f" (split seed {spec.seed + offset})" if offset else ""
                raise CubebenchError(f"task {spec.name}{seed}: {error}") from None
            except Exception:
                pass


def _resume_changes(run_dir: Path) -> list[str]:
    from cubebench.results import RUN_MANIFEST, read_json

    resumed = read_json(run_dir / RUN_MANIFEST).get("resumed") or [{}]
    return resumed[-1].get("environment_changed", [])


def _cmd_sync(args: argparse.Namespace) -> int:
    from cubebench.tracking import sync

    summary = sync(args.run_dir, args.experiment)
    print(
        f"mlflow {scrub(summary.uri)}: pushed {len(summary.pushed)} case(s)"
        + (f" ({', '.join(summary.pushed)})" if summary.pushed else "")
        + f", {len(summary.already)} already there"
        + (", suite run completed" if summary.suite_pushed else "")
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from cubebench.report import write_report

    for path in write_report(args.run_dir):
        print(path)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from cubebench.compare import write_compare

    for path in write_compare(args.run_dirs, args.out, args.by, args.force):
        print(path)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from cubebench.compare import export_parquet

    rows = export_parquet(args.run_dirs, args.parquet)
    print(f"{args.parquet}: {rows} results")
    return 0


def _print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = (
                " x ".join(map(str, value)) if key.endswith("shape") else ", ".join(map(str, value))
            )
        print(f"{key:<{width}}  {value}")


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of the rest of the CLI."""

    def error(self, message: str):  # type: ignore[override]
        message = _one_line(f"{message} (see {self.prog} --help)")
        self.exit(EXIT_USER_ERROR, f"cubebench: error: {message}\n")


def _one_line(text: str) -> str:
    """`text` on one line: line breaks a user typed into an argument are shown as `\\n`."""
    return "\\n".join(text.splitlines())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cubebench",
        description="Benchmarks for machine learning on Earth System Data Cubes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("make-cube", help="write a synthetic ESDC-like cube")
    from cubebench.cube.schema import PROFILES  # light: no framework, no zarr
    from cubebench.cube.synthetic import LAYOUTS, PRESETS

    p.add_argument("--preset", choices=list(PRESETS), default="small")
    p.add_argument("--layout", choices=list(LAYOUTS), default="balanced")
    p.add_argument("--chunks", metavar="T,Y,X", help="explicit chunk shape (overrides --layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", type=int, choices=(2, 3), default=3, help="Zarr format")
    p.add_argument("--profile", choices=list(PROFILES), default="esdc-2.1.1")
    p.add_argument("--output", type=Path, help="where to write (default: the cube cache)")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    _add_dask_scheduler_arg(p, "compute and write the chunks")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_cmd_make_cube)

    p = sub.add_parser("rechunk", help="copy a cube with another chunk layout (same stored values)")
    p.add_argument("src", help="synthetic:<preset>[?..], a Zarr path or a remote Zarr URL")
    p.add_argument("dst", type=Path, help="where to write the copy (a local Zarr directory)")
    p.add_argument(
        "--layout",
        required=True,
        metavar="map|ts|balanced|T,Y,X",
        help="map: one time step per chunk; ts: long time series of small tiles; balanced: "
        "a quarter of every axis; or an explicit chunk shape",
    )
    _add_storage_option_arg(p)
    _add_dask_scheduler_arg(p, "move the chunks", " (default: local, one per core)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_cmd_rechunk)

    p = sub.add_parser("prepare", help="prepare a task on a cube and print its summary")
    _add_cube_args(p)
    _add_task_args(p, "lst-from-t2m")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the task's)")
    p.add_argument("--region", metavar="LAT0,LAT1[,LON0,LON1]", help="restrict to a box")
    p.add_argument("--time", metavar="START,END", help="restrict to a date range")
    p.add_argument("--fractions", metavar="TRAIN,VAL,TEST", help="split fractions")
    _add_split_args(p)
    _add_dask_scheduler_arg(p, "compute the split and statistics")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("bench-loader", help="loader throughput vs raw decode, and its costs")
    _add_cube_args(p)
    _add_task_args(p, "lst-from-t2m")
    p.add_argument("--part", default="train")
    _add_split_args(p)
    p.add_argument(
        "--geometry",
        choices=("pixel", "patch"),
        help="sample pixels or windows (default: the task's; lst-gapfill has windows)",
    )
    p.add_argument(
        "--patch", metavar="T,H,W[/ST,SH,SW]", help="window size and stride (implies patch)"
    )
    p.add_argument("--batch-size", type=_positive(int), help="default: 4096 pixels or 32 windows")
    p.add_argument("--adapter", choices=("numpy", "torch", "tf"), default="numpy")
    p.add_argument(
        "--epochs",
        type=_positive(int),
        default=2,
        help="fewest measured (reference, loader) pairs after a warm-up pair (default 2)",
    )
    p.add_argument(
        "--max-seconds",
        type=_non_negative(float),
        default=30.0,
        help="add pairs until the ratio's 95%% interval is within ±10%% or this long "
        "(default 30; 0: exactly --epochs)",
    )
    p.add_argument(
        "--threads",
        type=_positive_list(int),
        default=[2],
        metavar="N[,N...]",
        help="decode threads; several: one line per count (default 2)",
    )
    p.add_argument(
        "--emulate-rate",
        type=_rate_or_sweep,
        metavar="R|sweep",
        help="feed an emulated accelerator of R samples/s (accelerator_utilisation), or find "
        "the highest R kept at >= 90%% utilisation",
    )
    p.add_argument(
        "--buffer-chunks", type=_positive(int), default=8, help="shuffle buffer, in chunks"
    )
    p.add_argument("--workers", type=int, default=0, help="torch DataLoader workers")
    p.add_argument("--reader", help="chunk reader (default: the fastest available)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_cmd_bench_loader)

    p = sub.add_parser("tasks", help="list the built-in tasks (task files)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_cmd_tasks)

    p = sub.add_parser("list", help="list the cases")
    p.add_argument("--cases-dir", type=Path, help="where case files live (default: cases/)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("run", help="run the cases, each in its own process, then the report")
    _add_cube_args(p)
    p.add_argument(
        "--cases",
        default="all",
        help="comma-separated case names, or all (with --task: all that fit the task)",
    )
    _add_task_args(p, None)
    p.add_argument("--cases-dir", type=Path, help="where case files live (default: cases/)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--epochs", type=_positive(int), help="override every case's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=_positive(int), help="threads per case (default: the CPU count)"
    )
    p.add_argument("--timeout", type=_positive(float), default=1800.0, help="seconds per case")
    p.add_argument(
        "--nproc",
        type=_positive(int),
        default=1,
        help="torch DDP ranks (torchrun; gloo on CPU, nccl on GPU, one GPU per rank) for the "
        "cases that support it; the ranks share --threads (default: %(default)s)",
    )
    p.add_argument(
        "--repeat",
        type=_positive(int),
        default=1,
        metavar="N",
        help="run every case N times, with seeds SEED .. SEED+N-1 (model initialisation and "
        "sample order); the report gives means and 95 %% intervals (default: %(default)s)",
    )
    p.add_argument(
        "--vary-split",
        action="store_true",
        help="with --repeat: the task's split seed moves with the repeat too",
    )
    _add_split_args(p)
    p.add_argument(
        "--param",
        action="append",
        metavar="CASE.KEY=V[,V...]",
        help="override a parameter of the cases CASE matches (a glob: '*.batch_size=1024'); "
        "several values, or several --param for one case: every combination runs, as "
        "variants named CASE[KEY=V,...]",
    )
    p.add_argument("--run-id", help="name of the run (default: date-time-random)")
    p.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="finish an interrupted run in --out: only its cases without a result run",
    )
    p.add_argument(
        "--join",
        metavar="RUN_ID",
        help="add the cases to run RUN_ID in --out (created when missing; same settings, "
        "waits while another suite writes it; cases with a result are not run again): one "
        "run across several images",
    )
    p.add_argument("--out", type=Path, default=Path("results"), help="results root")
    p.add_argument("--experiment", default="cubebench", help="mlflow experiment name")
    p.add_argument(
        "--no-tracking", action="store_true", help="results on disk only (sync them later)"
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "sync",
        help="push a run's results to mlflow (MLFLOW_TRACKING_URI, else the results "
        "directory's sqlite store); runs already there are skipped",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--experiment", default="cubebench", help="mlflow experiment name")
    p.set_defaults(func=_cmd_sync)

    p = sub.add_parser("report", help="write report.md, report.html and plots for a run")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "compare",
        help="runs side by side (CPU vs GPU image, two machines, two layouts): compare.md, "
        "compare.html, compare.json",
    )
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--by", choices=("case", "library", "device", "image"), default="case")
    p.add_argument("--out", type=Path, required=True, help="where the comparison goes")
    p.add_argument(
        "--force", action="store_true", help="compare runs whose task, cube or split differ"
    )
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("export", help="the results of runs as one flat table (Parquet)")
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--parquet", type=Path, required=True, metavar="FILE")
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interrupts.install()  # Ctrl-C and SIGTERM (`docker stop`) interrupt, and are never lost
    try:
        code = args.func(args)
        if code == 0:
            interrupts.check()  # an interrupt a library swallowed on the way: not a success
        return code
    except CubebenchError as exc:
        print(f"cubebench: error: {_one_line(str(exc))}", file=sys.stderr)
        # zarr's reads still pending when a store fails to open are destroyed at exit, and
        # asyncio logs each one ("Task was destroyed but it is pending!"): noise after the
        # one line that says what went wrong
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("cubebench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
