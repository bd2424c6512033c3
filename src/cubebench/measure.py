"""The one path that runs and measures a case: prepare → setup → fit → evaluate → record.

The worker (`cubebench run`), the notebooks' inline run (`cubebench.explore`), the asv suite
and the tests all call `run_case`, so every number of a result has one definition for every
library:

- `warmup_s`: `setup()` plus whatever `fit()` books as warm-up (compile, tracing, the first
  step of each shape, on resident batches with the model put back);
- `fit_s`: the rest of `fit()`: the training epochs with their validation passes;
- `probe_s`: measurements inside `fit()` that are neither (the compute probe of the stall);
- stall: (training-loop time − steps × compute time of a step on resident batches) / fit_s,
  with the 95 % interval of that compute time, never clamped; the wait inside
  `next(batch)` where it can be timed directly, under its own key;
- accuracy on the eval part in physical units, with the floor realised on the evaluated
  pixels (`cubebench.oracle`);
- on CUDA (`gpu`): NVML's utilisation sampled during `fit()` and the device time of the
  training batches' host-to-device copies where the loop makes them (`cubebench.gpu`).
"""

from __future__ import annotations

import functools
import math
import random
import resource
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cubebench import gpu, ranks, results
from cubebench.case import Case, Context, EpochRecord
from cubebench.metrics import RegressionMetrics
from cubebench.oracle import noise_free_target
from cubebench.redact import scrub
from cubebench.task import PreparedTask
from cubebench.timing import stall_estimate

QUALITY_FACTOR = 1.10  # time to quality: validation RMSE within 10 % of the floor (MLPerf-like)

Phase = Callable[[str], None]


def _cuda_present() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def resolve_device(requested: str, devices: tuple[str, ...]) -> str:
    if requested == "auto":
        return "cuda" if "cuda" in devices and _cuda_present() else "cpu"
    if requested not in devices:
        raise RuntimeError(f"runs on {', '.join(devices)} only, not {requested}")
    return requested


def library_version(name: str) -> str | None:
    from importlib import metadata

    for candidate in (name, f"{name}-cpu"):  # tensorflow-cpu provides tensorflow
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


@dataclass
class Evaluation:
    metrics: dict
    predict_seconds: float
    samples: int


def evaluate(case: Case, context: Context) -> Evaluation:
    """Every predictor of the case on its eval part, in physical units.

    The metrics are the first predictor's, plus `by_predictor`; the time is the first
    predictor's own (its `predict` calls only); samples are pixels, or windows on a patch task
    (whose metrics cover the pixels to fill: the batch's mask). Predictions are denormalised
    with the train-only statistics. The floor is realised on the same pixels where the cube's
    generating function is known, else nominal."""
    task = context.task
    mean, std = task.target_mean, task.target_std
    oracle = noise_free_target(task)
    floor = RegressionMetrics()
    by_predictor: dict[str, RegressionMetrics] = {}
    first_seconds, first_samples = 0.0, 0
    for i, (name, predict) in enumerate(case.predictors().items()):
        stream = context.stream(case.eval_part, shuffle=False)
        metrics = RegressionMetrics()
        seconds, samples = 0.0, 0
        for x, y, *mask in stream.batches(0):
            samples += len(x)
            start = time.perf_counter()
            y_hat = np.asarray(predict(x), np.float64).reshape(-1)
            seconds += time.perf_counter() - start
            y = y.reshape(-1) * std + mean
            keep = mask[0].reshape(-1) > 0 if mask else slice(None)  # windows: pixels to fill
            metrics.update(y[keep], (y_hat * std + mean)[keep])
            if i == 0 and oracle is not None:
                floor.update(y[keep], oracle(x).reshape(-1)[keep])
        # DDP: each rank evaluated its share; the ranks predicted in parallel
        shares = ranks.gather((metrics, seconds, samples))
        by_predictor[name] = functools.reduce(RegressionMetrics.merge, (m for m, _, _ in shares))
        if i == 0:
            first_seconds = max(s for _, s, _ in shares)
            first_samples = sum(n for _, _, n in shares)
    floor = functools.reduce(RegressionMetrics.merge, ranks.gather(floor))
    nominal = task.noise_floor
    realised = floor.result()["rmse"] if floor.n else None
    best = realised if realised is not None else nominal
    source = "realised" if realised is not None else ("nominal" if nominal else None)
    scored = {name: m.result(best) for name, m in by_predictor.items()}
    first = next(iter(scored.values()))
    rmse = {name: m["rmse"] for name, m in scored.items()}
    metrics = {
        **first,
        "noise_floor_nominal": nominal,
        "noise_floor_source": source,
        "units": task.target_units,
        "eval_part": case.eval_part,
        "by_predictor": scored,
        **case.extra_metrics(rmse),
    }
    return Evaluation(metrics, first_seconds, first_samples)


def epoch_rows(context: Context) -> list[dict]:
    """The epochs a case logged, as rows of its result."""
    return [{k: v for k, v in asdict(e).items() if k != "extra"} | e.extra for e in context.epochs]


def throughput_record(context: Context, fit: float, evaluation: Evaluation) -> dict[str, Any]:
    """Training and inference samples per second of a fitted and evaluated case."""
    train = context.train_samples or sum(e.samples for e in context.epochs) or None
    predict = evaluation.predict_seconds
    return {
        "train_samples": train,
        "train_samples_per_s": train / fit if train and fit else None,
        "predict_samples_per_s": evaluation.samples / predict if predict else None,
    }


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def loading_record(context: Context, fit: float) -> dict[str, Any]:
    """What the training streams cost: the stall (one definition for every library), the
    wait measured directly where the loop is ours, read amplification, bytes, decode time.
    Counters are summed over DDP ranks, fractions are the ranks' means."""
    loop, compute = context.loop, context.compute
    stall = stall_estimate(loop, compute) if compute is not None and loop.steps else None
    own = {
        "stall": None if stall is None or not fit else stall.seconds / fit,
        "ci95": None if stall is None or not fit else stall.ci95 / fit,
        "wait": loop.wait_seconds / fit if loop.wait_observable and fit else None,
        "loop_s": loop.seconds if loop.steps else None,
        "steps": loop.steps or None,
        "step_s": None if compute is None else compute.mean,
        "step_ci95": None if compute is None else compute.ci95,
    }
    shares = ranks.gather((context.loading(), own))
    loading = sum((s for s, _ in shares[1:]), shares[0][0])
    mine = [m for _, m in shares]

    def mean(key: str) -> float | None:
        values = [m[key] for m in mine]
        return None if any(v is None for v in values) else sum(values) / len(values)

    used_streams = bool(context.train_streams)
    return {
        "stall_fraction": _rounded(mean("stall")),
        "stall_ci95": _rounded(mean("ci95")),
        "stall_method": "resident-steps" if mean("stall") is not None else None,
        "wait_fraction": _rounded(mean("wait")),
        "steps": own["steps"],
        "train_loop_s": _rounded(mean("loop_s"), 4),
        "compute_step_s": _rounded(mean("step_s"), 9),
        "compute_step_ci95": _rounded(mean("step_ci95"), 9),
        "read_amplification": (
            _rounded(loading.read_amplification, 4)
            if used_streams and loading.bytes_needed
            else None
        ),
        "bytes_needed": loading.bytes_needed if used_streams else None,
        "chunks_decoded": loading.chunks_decoded if used_streams else None,
        "bytes_read": loading.bytes_read if used_streams else None,
        "bytes_decoded": loading.bytes_decoded if used_streams else None,
        "decode_s": round(loading.decode_seconds, 4) if used_streams else None,
        "time_to_first_batch_s": loading.time_to_first_batch_s,
    }


def time_to_quality(
    epochs: list[EpochRecord], target_std: float, floor: float | None
) -> dict[str, Any] | None:
    """Training time and samples until the validation RMSE first reaches QUALITY_FACTOR x the
    floor, at epoch granularity (MLPerf's time-to-train). Cases that train in stages (transfer:
    pretraining, then fine-tuning on the target) are judged on their last stage's validation,
    with the time of every stage before it. None without a floor or a validation loss."""
    if not floor or not any(e.val_loss is not None for e in epochs):
        return None
    last_stage = max((e.extra.get("stage", 0.0) for e in epochs), default=0.0)
    target = QUALITY_FACTOR * floor
    seconds, samples = 0.0, 0
    for record in epochs:
        seconds += record.seconds
        samples += record.samples
        judged = record.extra.get("stage", 0.0) == last_stage and record.val_loss is not None
        if judged and math.sqrt(max(record.val_loss, 0.0)) * target_std <= target:
            return {
                "target_rmse": round(target, 6),
                "seconds": round(seconds, 4),
                "samples": samples or None,
                "epoch": record.epoch,
            }
    return {"target_rmse": round(target, 6), "seconds": None, "samples": None, "epoch": None}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpu_peak_mb(device: str) -> float | None:
    return gpu.gpu_peak_mb() if device == "cuda" else None


# `gpu.h2d_note` where no copy was timed and the framework did not say why
UNTIMED_COPIES = (
    "not measured: no copy went through cubebench.loading.torch.to_device "
    "(the library moves its data to the GPU itself)"
)
NO_UTILISATION = "no NVML reading: nvidia-ml-py, the driver or the device not found"


def gpu_record(sampler: gpu.Sampler | None, copies: gpu.CopyClock) -> dict[str, Any]:
    """The GPU figures of a CUDA result: NVML's utilisation during the fit (mean and 10th
    percentile over every rank's readings, pooled), and the device time and bytes of the
    training batches' host-to-device copies (summed over the ranks), or why they are null.
    Waits for the copies' last events: call it after the fit."""
    seconds = copies.seconds()
    mine = {
        "name": (sampler.name if sampler else None) or gpu.device_name(),
        "utilisation": list(sampler.utilisation) if sampler else [],
        "memory": max(sampler.memory, default=None) if sampler else None,
        "error": sampler.error if sampler else NO_UTILISATION,
        "seconds": seconds,
        "bytes": copies.bytes if seconds is not None else None,
        "note": copies.note,
    }
    shares = ranks.gather(mine)
    stats = gpu.summarise([u for share in shares for u in share["utilisation"]])
    names = sorted({share["name"] for share in shares if share["name"]})
    memory = [share["memory"] for share in shares if share["memory"] is not None]
    timed = all(share["seconds"] is not None for share in shares)
    note = next((share["note"] for share in shares if share["note"]), UNTIMED_COPIES)
    errors = [share["error"] for share in shares if share["error"]]
    return {
        "name": ", ".join(names) or None,
        "utilisation_mean_pct": _rounded(stats.mean, 2),
        "utilisation_p10_pct": _rounded(stats.p10, 2),
        "utilisation_samples": stats.count,
        "sample_interval_s": sampler.interval_s if sampler else gpu.INTERVAL_S,
        "utilisation_note": None if stats.count else (errors[0] if errors else NO_UTILISATION),
        "memory_used_max_mb": round(max(memory) / 2**20, 1) if memory else None,
        "h2d_copy_s": _rounded(sum(s["seconds"] for s in shares)) if timed else None,
        "h2d_bytes": sum(s["bytes"] for s in shares) if timed else None,
        "h2d_note": None if timed else note,
    }


@dataclass
class Measured:
    """A case run by `run_case`: its result record, and (when it got that far) the trained
    case, its context and its task, for a notebook to look at."""

    result: dict
    case: Case | None = None
    context: Context | None = None
    task: PreparedTask | None = None
    evaluation: Evaluation | None = None


def run_case(
    cls: type[Case],
    cube: Any,
    *,
    run_id: str,
    name: str | None = None,
    task_choice: dict | None = None,
    params: dict | None = None,
    device: str = "auto",
    seed: int = 0,
    split_seed: int | None = None,
    split: str | None = None,
    buffer: int | None = None,
    repeat: int = 0,
    threads: int = 2,
    environment: dict,
    task: PreparedTask | None = None,
    storage_options: dict | None = None,
    tensorboard_dir: str | None = None,
    on_phase: Phase = lambda phase: None,
    on_epoch: Callable[[EpochRecord, int], None] | None = None,
) -> Measured:
    """Run one case and measure it; never raises for the case's own failures (the result says
    why, in one line, and the traceback goes to stderr).

    `cube`: a spec for `open_cube` or an opened dataset; `task`: an already prepared task of
    the case's task (saves preparing it again); `split_seed`: the task's split seed (None:
    the task's own); `split`, `buffer`: the command line's (`task.with_split`); `seed`: model
    initialisation and sample order; `name`: the result's case name, the class's unless a
    variant (`case[key=value]`, `cubebench.grid`) runs; `task_choice`: the run's `--task`,
    `--inputs`, `--target` (`task.task_for`), else the case's own task."""
    from cubebench.cube import open_cube
    from cubebench.task import prepare_task, task_for, with_split

    started = time.perf_counter()
    random.seed(seed)
    np.random.seed(seed)
    params = {**cls.parameters, **(params or {})}
    spec = cube if isinstance(cube, str) else cube.attrs.get("cubebench_source", "dataset")
    chosen = task_for(cls.task, task_choice)
    base_split = chosen.seed
    result = results.new_result(
        run_id=run_id,
        case=name or cls.name,
        library=cls.library,
        library_version=library_version(cls.library),
        task=chosen.name,
        params=params,
        seed=seed,
        split_seed=base_split if split_seed is None else split_seed,
        repeat=repeat,
        threads=threads,
        world_size=ranks.world_size(),
        device="cpu",
        cube_spec=scrub(spec),
        environment=environment,
        started_at=results.now(),
    )
    context: Context | None = None
    case: Case | None = None
    evaluation: Evaluation | None = None
    try:
        result["device"] = device = resolve_device(device, cls.devices)
        ranks.start(device)
        on_phase("preparing the task")
        if task is None:
            dataset = open_cube(cube, storage_options) if isinstance(cube, str) else cube
            spec = with_split(task_for(cls.task, task_choice, seed=split_seed), split, buffer)
            task = prepare_task(spec, dataset)
        elif task.spec.name != chosen.name:
            raise ValueError(f"{cls.name} runs task {chosen.name!r}, not {task.spec.name!r}")
        result["split_seed"] = task.spec.seed
        result["split"] = str(task.spec.split)
        result["cube"].update(fingerprint=task.fingerprint, chunk_shape=list(task.chunk_shape))
        result["timing"]["prepare_s"] = round(time.perf_counter() - started, 3)
        context = Context(
            task,
            params,
            device=device,
            seed=seed,
            threads=threads,
            tensorboard_dir=tensorboard_dir if ranks.rank() == 0 else None,
            on_epoch=on_epoch,
        )
        case = cls(context)
        on_phase("setting up")
        start = time.perf_counter()
        case.setup()
        setup = time.perf_counter() - start
        on_phase("training")
        before = context.clock.snapshot()
        with gpu.sampling(device) as sampler:  # NVML opened and shut outside the clock
            start = time.perf_counter()
            case.fit()
            fit_wall = time.perf_counter() - start
        booked = {k: context.clock.since(before, k) for k in ("warmup", "probe")}
        fit = fit_wall - booked["warmup"] - booked["probe"]
        on_phase("evaluating")
        evaluation = evaluate(case, context)
        result.update(status="ok", metrics=evaluation.metrics, epochs=epoch_rows(context))
        result["timing"].update(
            warmup_s=round(setup + booked["warmup"], 4),
            fit_s=round(fit, 4),
            probe_s=round(booked["probe"], 4),
            predict_s=round(evaluation.predict_seconds, 4),
        )
        result["throughput"].update(throughput_record(context, fit, evaluation))
        result["loading"] = loading_record(context, fit)
        result["gpu"] = gpu_record(sampler, context.copies) if device == "cuda" else None
        result["time_to_quality"] = time_to_quality(
            context.epochs, task.target_std, evaluation.metrics["noise_floor_rmse"]
        )
        peak_rss = sum(ranks.gather(_peak_rss_mb()))  # every rank's footprint
    except Exception as error:  # the case failed: say why in one line, keep the traceback
        sys.stderr.write(scrub(traceback.format_exc()))
        where = f"rank {ranks.rank()}: " if ranks.world_size() > 1 else ""
        result["reason"] = scrub(f"{where}{type(error).__name__}: {error}".splitlines()[0][:500])
        peak_rss = _peak_rss_mb()
    finally:
        if context is not None:
            context.close()  # the event files are complete before the result says so
    result["memory"] = {
        "peak_rss_mb": round(peak_rss, 1),
        "gpu_peak_mb": _gpu_peak_mb(result["device"]),
    }
    result["timing"]["total_s"] = round(time.perf_counter() - started, 3)
    result["finished_at"] = results.now()
    return Measured(result, case, context, task, evaluation)
