"""The report's rows, as plain dicts of raw values (also handy in a notebook:
`pandas.DataFrame(aggregate_table(results))`):

- `results_table`: one row per result file (a repeat of a case);
- `aggregate_table`: one row per case, aggregated over its ok repeats (mean, sd, 95 % interval);
  failed and missing repeats are counted and named, never averaged in;
- `comparison_table`: pairs of cases of different libraries within a task, per metric, with
  a t-test and Holm's adjustment;
- `transfer_table`: the cases that evaluated several predictors;
- `task_sections` and `summary`: all of it grouped by task, as the report and summary.json
  show it. A sample of one task (a pixel) is not a sample of another (a window), so nothing
  is ever compared or ranked across tasks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from cubebench.display import number
from cubebench.stats import compare, holm, summarize

ALPHA = 0.05  # significance level of the comparisons (after Holm's adjustment)
TTQ_FACTOR = 1.1  # time to quality: validation RMSE <= 1.1 x the noise floor
# aggregated over repeats with a 95 % interval: key of a `results_table` row
AGGREGATED = (
    "rmse",
    "rmse_over_noise_floor",
    "train_samples_per_s",
    "fit_s",
    "stall_fraction",
    "ttq_seconds",
)
# averaged over the ok repeats, shown without an interval
MEANS = (
    "mae",
    "r2",
    "bias",
    "predict_samples_per_s",
    "wait_fraction",
    "read_amplification",
    "peak_rss_mb",
    "noise_floor_rmse",
    "noise_floor_nominal",
    "transfer_gain",
    "gpu_util_mean_pct",
    "gpu_util_p10_pct",
    "h2d_copy_s",
)
STATS = ("n", "sd", "ci95_low", "ci95_high", "half_width")
# compared between cases: (key, label)
COMPARED = (("rmse", "RMSE"), ("train_samples_per_s", "train samples/s"))
NO_TASK = None  # the task of a case without any result file: unknown


def get(mapping: Any, *keys: str) -> Any:
    """mapping[k1][k2]... or None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _time_to_quality(result: dict) -> dict:
    """The ttq_* keys of a result row: state "reached", "never" (measured, not reached) or
    None (not measured: no record, a version 1 result)."""
    ttq = result.get("time_to_quality")
    if not isinstance(ttq, dict):
        return {"ttq_state": None, "ttq_target_rmse": None, "ttq_seconds": None}
    seconds = number(ttq.get("seconds"))
    return {
        "ttq_state": "never" if seconds is None else "reached",
        "ttq_target_rmse": number(ttq.get("target_rmse")),
        "ttq_seconds": seconds,
        "ttq_samples": _int(ttq.get("samples")),
        "ttq_epoch": _int(ttq.get("epoch")),
    }


def _gpu(result: dict) -> dict:
    """The gpu_* keys of a result row: `gpu_measured` where the result has a `gpu` record
    (a cuda result), NVML's utilisation and the host-to-device copies from it."""
    record = result.get("gpu")
    return {
        "gpu_measured": isinstance(record, dict),
        "gpu_name": get(record, "name"),
        "gpu_util_mean_pct": number(get(record, "utilisation_mean_pct")),
        "gpu_util_p10_pct": number(get(record, "utilisation_p10_pct")),
        "h2d_copy_s": number(get(record, "h2d_copy_s")),
        "h2d_bytes": _int(get(record, "h2d_bytes")),
    }


def results_table(results: Sequence[dict], cases: Iterable[str] | None = None) -> list[dict]:
    """One row of raw values per result (a repeat of a case), in the given order. Numbers are
    unrounded floats or None. Names in `cases` without any result (an interrupted run) get a
    row with status "missing"."""
    rows = []
    for r in results:
        metrics = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
        name, version = r.get("library") or None, r.get("library_version")
        stall = number(get(r, "loading", "stall_fraction"))
        stall_ci95 = number(get(r, "loading", "stall_ci95"))
        wait = number(get(r, "loading", "wait_fraction"))
        fit_s = number(get(r, "timing", "fit_s"))
        rows.append(
            {
                "case": str(r.get("case", "?")),
                "task": r.get("task"),
                "repeat": _int(r.get("repeat")) or 0,
                "seed": _int(r.get("seed")),
                "split_seed": _int(r.get("split_seed")),
                "schema_version": r.get("schema_version"),
                "library": " ".join(str(v) for v in (name, version) if v) or None,
                "library_name": name,
                "library_version": version,
                "status": r.get("status"),
                "reason": r.get("reason"),
                "units": metrics.get("units"),
                "rmse": number(metrics.get("rmse")),
                "rmse_over_noise_floor": number(metrics.get("rmse_over_noise_floor")),
                "noise_floor_rmse": number(metrics.get("noise_floor_rmse")),
                "noise_floor_nominal": number(metrics.get("noise_floor_nominal")),
                "noise_floor_source": metrics.get("noise_floor_source"),
                "mae": number(metrics.get("mae")),
                "r2": number(metrics.get("r2")),
                "bias": number(metrics.get("bias")),
                "transfer_gain": number(metrics.get("transfer_gain")),
                "train_samples": _int(get(r, "throughput", "train_samples")),
                "train_samples_per_s": number(get(r, "throughput", "train_samples_per_s")),
                "predict_samples_per_s": number(get(r, "throughput", "predict_samples_per_s")),
                "prepare_s": number(get(r, "timing", "prepare_s")),
                "fit_s": fit_s,
                "probe_s": number(get(r, "timing", "probe_s")),
                "total_s": number(get(r, "timing", "total_s")),
                "stall_fraction": stall,
                "stall_percent": None if stall is None else 100.0 * stall,
                "stall_ci95": stall_ci95,
                "stall_method": get(r, "loading", "stall_method"),
                "wait_fraction": wait,
                "wait_percent": None if wait is None else 100.0 * wait,
                "fit_wait_s": None if stall is None or fit_s is None else fit_s * stall,
                "read_amplification": number(get(r, "loading", "read_amplification")),
                "peak_rss_mb": number(get(r, "memory", "peak_rss_mb")),
                **_gpu(r),
                **_time_to_quality(r),
            }
        )
    seen = {row["case"] for row in rows}
    for name in map(str, cases or ()):
        if name not in seen:
            seen.add(name)
            rows.append({"case": name, "status": "missing", "reason": "no result file"})
    return rows


# --------------------------------------------------------------------------------------------
# aggregation over repeats


def _by_case(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """The rows of each case, cases in order of first appearance, repeats in order."""
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["case"], []).append(row)
    for group in grouped.values():
        group.sort(key=lambda row: row.get("repeat") or 0)
    return grouped


def _mean(values: Iterable[Any]) -> float | None:
    return summarize(list(values))["mean"]


def _common(values: Iterable[Any]) -> Any:
    """The one value every row agrees on, else None."""
    distinct = {v for v in values if v is not None}
    return distinct.pop() if len(distinct) == 1 else None


def _aggregate_case(case: str, group: list[dict], expected: int) -> dict:
    present = [row for row in group if row.get("status") != "missing"]
    ok = [row for row in present if row.get("status") == "ok"]
    failed = [row for row in present if row.get("status") != "ok"]
    seen = {row.get("repeat") or 0 for row in present}
    expected = max(expected, max(seen, default=-1) + 1)
    missing = [] if not present else [r for r in range(expected) if r not in seen]
    first = (ok or present or group)[0]
    if not present:
        status = "missing"
    elif not ok:
        status = "failed"
    else:
        status = "ok" if not failed and not missing else "partial"
    row: dict[str, Any] = {
        "case": case,
        "task": first.get("task"),
        "library": first.get("library"),
        "library_name": first.get("library_name"),
        "library_version": _common(r.get("library_version") for r in ok)
        or first.get("library_version"),
        "units": _common(r.get("units") for r in ok),
        "status": status,
        "n_repeats": expected if present else 0,
        "n_ok": len(ok),
        "n_failed": len(failed),
        "n_missing": len(missing),
        "failed": [
            {"repeat": r.get("repeat") or 0, "seed": r.get("seed"), "reason": r.get("reason")}
            for r in failed
        ],
        "missing": missing,
        "reason": first.get("reason") if status == "missing" else _reasons(failed),
        "seeds": [r.get("seed") for r in ok],
        "split_seeds": [r.get("split_seed") for r in ok],
        "stall_method": _common(r.get("stall_method") for r in ok),
        "noise_floor_source": _common(r.get("noise_floor_source") for r in ok),
        "gpu_measured": any(r.get("gpu_measured") for r in present),
        "gpu_name": _common(r.get("gpu_name") for r in ok),
    }
    reached = [r for r in ok if r.get("ttq_state") == "reached"]
    row["ttq_measured"] = sum(1 for r in ok if r.get("ttq_state") is not None)
    row["ttq_reached"] = len(reached)
    row["ttq_target_rmse"] = _mean(r.get("ttq_target_rmse") for r in ok)
    for key in AGGREGATED:
        values = [r.get(key) for r in ok]
        if key == "ttq_seconds" and (not ok or len(reached) < len(ok)):
            values = []  # a mean of the repeats that got there would flatter the case
        s = summarize(values)
        row[key] = s["mean"]
        row.update({f"{key}_{stat}": s[stat] for stat in STATS})
    for key in MEANS:
        row[key] = _mean(r.get(key) for r in ok)
    _stall_display(row, ok)
    return row


def _stall_display(row: dict, ok: list[dict]) -> None:
    """stall_percent and its ± in %: over the repeats where there are several, else the one
    measurement's own interval (stall_ci95); `stall_interval` says which."""
    stall, fit = row["stall_fraction"], row["fit_s"]
    row["stall_percent"] = None if stall is None else 100.0 * stall
    half, source = row["stall_fraction_half_width"], "repeats"
    if half is None and row["stall_fraction_n"] == 1:
        half = next((r.get("stall_ci95") for r in ok if r.get("stall_fraction") is not None), None)
        source = "measurement"
    row["stall_percent_half_width"] = None if half is None else 100.0 * half
    row["stall_interval"] = source if half is not None else None
    wait = row["wait_fraction"]
    row["wait_percent"] = None if wait is None else 100.0 * wait
    row["fit_wait_s"] = None if stall is None or fit is None else fit * stall
    row["fit_wait_s_half_width"] = None if half is None or fit is None else fit * half
    row["fit_measured_wait_s"] = None if wait is None or fit is None else fit * wait


def _reasons(failed: list[dict]) -> str | None:
    """The failed repeats' reasons, identical ones once."""
    reasons = list(dict.fromkeys(str(r.get("reason") or "no reason given") for r in failed))
    return "; ".join(reasons) or None


def aggregate_table(
    results: Sequence[dict], cases: Iterable[str] | None = None, repeats: int | None = None
) -> list[dict]:
    """One row per case, in order of first appearance (then `cases` without any result, status
    "missing"): for each key of AGGREGATED the mean over the ok repeats under the key itself
    and `<key>_n`, `_sd`, `_ci95_low`, `_ci95_high`, `_half_width` (Student t; None with one
    repeat); MEANS as plain means; `n_repeats` (the run's `repeats`, or more if files say so),
    `n_ok`, `n_failed`, `n_missing`, the failed repeats (`failed`: repeat, seed, reason) and
    missing ones (`missing`); status "ok" (every repeat), "partial", "failed" or "missing".

    `ttq_seconds` is aggregated only when every ok repeat reached the target (`ttq_reached`
    of `n_ok`), else None."""
    rows = results_table(results, cases)
    expected = repeats if isinstance(repeats, int) and repeats > 0 else 1
    return [_aggregate_case(case, group, expected) for case, group in _by_case(rows).items()]


# --------------------------------------------------------------------------------------------
# comparisons


def _prefix_and_rest(case: str) -> tuple[str, str]:
    head, _, rest = case.partition("-")
    return head, rest


def is_twin(a: str, b: str) -> bool:
    """torch-X and keras-X: the same model written for two frameworks."""
    (pa, ra), (pb, rb) = _prefix_and_rest(a), _prefix_and_rest(b)
    return bool(ra) and ra == rb and {pa, pb} == {"torch", "keras"}


def _samples(rows: Sequence[dict], key: str) -> dict[tuple, float]:
    """{(seed, split_seed): value} of the ok repeats with a value; a repeated key (which only
    a hand-made run has) makes the sample unpairable: its key then carries the repeat."""
    out: dict[tuple, float] = {}
    for row in rows:
        value = row.get(key)
        if row.get("status") != "ok" or value is None:
            continue
        seeds = (row.get("seed"), row.get("split_seed"))
        out[seeds if seeds not in out else (*seeds, row.get("repeat"))] = value
    return out


def _pairs(cases: Sequence[dict]) -> list[tuple[dict, dict]]:
    """Pairs of cases (aggregate rows) of different libraries, twins first."""
    pairs = [
        (a, b)
        for i, a in enumerate(cases)
        for b in cases[i + 1 :]
        if a.get("library_name") != b.get("library_name")
    ]
    return sorted(pairs, key=lambda p: not is_twin(p[0]["case"], p[1]["case"]))


def comparison_table(results: Sequence[dict], alpha: float = ALPHA) -> list[dict]:
    """Per task, per metric of COMPARED, per pair of cases of different libraries (twins
    torch-X / keras-X first): `difference` = mean(a) − mean(b) over the ok repeats, the
    two-sided p-value (`test` "paired" when both ran on the same seeds, matched by seed, else
    "welch"; None with fewer than 2 repeats a side or no variance), `p_adjusted` (Holm within
    task × metric) and `significant` (p_adjusted < alpha; None where untested)."""
    rows = results_table(results)
    groups = _by_case(rows)
    cases = [_aggregate_case(c, g, 1) for c, g in groups.items()]
    out: list[dict] = []
    for task in dict.fromkeys(c["task"] for c in cases if c["task"] is not None):
        in_task = [c for c in cases if c["task"] == task]
        for key, label in COMPARED:
            block = []
            for a, b in _pairs(in_task):
                sa, sb = _samples(groups[a["case"]], key), _samples(groups[b["case"]], key)
                paired = len(sa) >= 2 and sa.keys() == sb.keys()
                p = compare(sa, sb, paired=paired)
                block.append(
                    {
                        "task": task,
                        "metric": key,
                        "label": label,
                        "a": a["case"],
                        "b": b["case"],
                        "library_a": a.get("library_name"),
                        "library_b": b.get("library_name"),
                        "twin": is_twin(a["case"], b["case"]),
                        "n_a": len(sa),
                        "n_b": len(sb),
                        "mean_a": a.get(key),
                        "mean_b": b.get(key),
                        "difference": None
                        if a.get(key) is None or b.get(key) is None
                        else a[key] - b[key],
                        "test": None if p is None else ("paired" if paired else "welch"),
                        "p": p,
                    }
                )
            for row, adjusted in zip(block, holm([row["p"] for row in block])):
                row["p_adjusted"] = adjusted
                row["significant"] = None if adjusted is None else bool(adjusted < alpha)
            out += block
    return out


# --------------------------------------------------------------------------------------------
# transfer


def transfer_table(results: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """(predictor names, rows) of the cases whose ok results evaluated more than one predictor
    (`metrics.by_predictor`): a row has `case`, `task`, `n` (ok repeats), `rmse` and
    `rmse_half_width` by predictor name, `transfer_gain` and `transfer_gain_half_width` (means
    over the repeats; half widths None with one). Predictor names keep the order in which the
    cases list them (the case's own first)."""
    names: list[str] = []
    by_case: dict[str, list[dict]] = {}
    for r in results:
        by_predictor = get(r, "metrics", "by_predictor")
        if r.get("status") != "ok" or not isinstance(by_predictor, dict) or len(by_predictor) < 2:
            continue
        names += [name for name in by_predictor if name not in names]
        by_case.setdefault(str(r.get("case", "?")), []).append(r)
    rows = []
    for case, group in by_case.items():
        predictors = [get(r, "metrics", "by_predictor") for r in group]
        rmse = {n: summarize([get(p, n, "rmse") for p in predictors]) for n in names}
        gain = summarize([get(r, "metrics", "transfer_gain") for r in group])
        rows.append(
            {
                "case": case,
                "task": group[0].get("task"),
                "n": len(group),
                "rmse": {n: s["mean"] for n, s in rmse.items() if s["n"]},
                "rmse_half_width": {n: s["half_width"] for n, s in rmse.items() if s["n"]},
                "transfer_gain": gain["mean"],
                "transfer_gain_half_width": gain["half_width"],
            }
        )
    return names, rows


# --------------------------------------------------------------------------------------------
# tasks


@cache
def sample_unit(task: str | None) -> str:
    """What one sample of `task` is: "pixel", "window" (patch tasks), or "sample" when the
    task is unknown to this cubebench (a renamed task in an old run)."""
    try:
        from cubebench.task import get_task

        spec = get_task(str(task))
        return "pixel" if spec.geometry == "pixel" else "window"
    except Exception:  # the report must render whatever the task registry does
        return "sample"


def plot_name(task: str | None) -> str:
    """File name of a task's accuracy-vs-throughput plot."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(task or "unknown")).strip("._") or "task"
    return f"accuracy_vs_throughput-{slug}.png"


def rankings(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(by training throughput, fastest first; by time to quality, quickest first) of a task's
    case rows: the ranked ok cases with a value, then those that never reached the target
    (`ttq_reached` < `n_ok`) and those not measured."""
    ok = [r for r in rows if r.get("n_ok")]
    fast = sorted(
        (r for r in ok if r.get("train_samples_per_s") is not None),
        key=lambda r: -r["train_samples_per_s"],
    )
    reached = sorted(
        (r for r in ok if r.get("ttq_seconds") is not None), key=lambda r: r["ttq_seconds"]
    )
    never = [r for r in ok if r.get("ttq_seconds") is None and r.get("ttq_measured")]
    unmeasured = [r for r in ok if not r.get("ttq_measured")]
    return fast, reached + never + unmeasured


@dataclass
class TaskSection:
    """Everything the report shows of one task."""

    task: str | None
    unit: str
    rows: list[dict]
    comparisons: list[dict] = field(default_factory=list)
    transfer: tuple[list[str], list[dict]] = field(default_factory=lambda: ([], []))
    splits: list[str] = field(default_factory=list)  # as the results say (`--split`'s text)

    @property
    def plot(self) -> str | None:
        return None if self.task is NO_TASK else plot_name(self.task)

    @property
    def repeated(self) -> bool:
        """Whether any case of the task has two ok repeats (intervals, tests)."""
        return any((r.get("n_ok") or 0) >= 2 for r in self.rows)


def task_sections(
    results: Sequence[dict], cases: Iterable[str] | None = None, repeats: int | None = None
) -> list[TaskSection]:
    """The report grouped by task (order of first appearance); cases without any result come
    last, in a section of their own (task None: unknown)."""
    rows = aggregate_table(results, cases, repeats)
    comparisons = comparison_table(results)
    names, transfer = transfer_table(results)
    sections = []
    for task in dict.fromkeys(row["task"] for row in rows if row["task"] is not NO_TASK):
        in_task = [r for r in transfer if r["task"] == task]
        used = [n for n in names if any(n in r["rmse"] for r in in_task)]
        sections.append(
            TaskSection(
                task,
                sample_unit(task),
                [row for row in rows if row["task"] == task],
                [c for c in comparisons if c["task"] == task],
                (used, in_task),
                sorted({r["split"] for r in results if r.get("task") == task and r.get("split")}),
            )
        )
    orphans = [row for row in rows if row["task"] is NO_TASK]
    if orphans:
        sections.append(TaskSection(NO_TASK, "sample", orphans))
    return sections


# --------------------------------------------------------------------------------------------
# summary.json


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _case_summary(row: dict) -> dict:
    out = {
        "library": row.get("library_name"),
        "library_version": row.get("library_version"),
    }
    out |= {
        key: row.get(key)
        for key in (
            "status",
            "n_repeats",
            "n_ok",
            "n_failed",
            "n_missing",
            "failed",
            "missing",
            "seeds",
        )
    }
    for key in AGGREGATED:
        name = "time_to_quality_s" if key == "ttq_seconds" else key
        out[name] = {"mean": row.get(key), **{s: row.get(f"{key}_{s}") for s in STATS}}
    out["time_to_quality_reached"] = {"reached": row.get("ttq_reached"), "of": row.get("n_ok")}
    half = row.get("stall_percent_half_width")
    out["stall_shown"] = {  # as the table shows it: one run carries its measurement's interval
        "mean": row.get("stall_fraction"),
        "half_width": None if half is None else half / 100.0,
        "interval": row.get("stall_interval"),
    }
    return out


def summary(manifest: dict, sections: Sequence[TaskSection], alpha: float = ALPHA) -> dict:
    """The content of summary.json: per task, per case the counts and aggregates, and the
    comparison rows (p, adjusted p, significant)."""
    keep = ("a", "b", "twin", "n_a", "n_b", "mean_a", "mean_b", "difference", "test", "p")
    tasks = {}
    for section in sections:
        if section.task is NO_TASK:
            continue
        tasks[section.task] = {
            "sample": section.unit,
            "plot": section.plot,
            "cases": {row["case"]: _case_summary(row) for row in section.rows},
            "comparisons": [
                {
                    "metric": c["metric"],
                    **{k: c[k] for k in keep},
                    "p_adjusted": c["p_adjusted"],
                    "significant": c["significant"],
                }
                for c in section.comparisons
            ],
        }
    orphans = [r["case"] for s in sections if s.task is NO_TASK for r in s.rows]
    repeat = manifest.get("repeat")
    return _clean(
        {
            "run_id": manifest.get("run_id"),
            "repeat": repeat if isinstance(repeat, int) else 1,
            "vary_split": bool(manifest.get("vary_split", False)),
            "alpha": alpha,
            "interval": "95 % Student t interval of the mean over the ok repeats",
            "adjustment": "Holm-Bonferroni within task x metric",
            "tasks": tasks,
            "missing_cases": orphans,
        }
    )
