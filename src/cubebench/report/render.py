"""The report as Markdown (report.md) and as one self-contained HTML page (report.html): one
section per task, each with its table, rankings, comparisons and plot, then the run-wide
plots and the environment. Both documents format the same rows (`tables`) the same way."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cubebench.display import MISSING, fmt, number
from cubebench.report.tables import ALPHA, NO_TASK, TTQ_FACTOR, TaskSection, get, rankings
from cubebench.results import PACKAGES

ESTIMATED_MARK = "~"  # prefix of a stall % that was estimated, not measured (version 1 results)
REASON_WIDTH = 80
TTQ_HEADER = f"time to {TTQ_FACTOR:g}× floor [s]"


def one_line(text: Any, width: int = REASON_WIDTH) -> str:
    """`text` on one line (whitespace collapsed), cut to `width` characters with an ellipsis."""
    line = " ".join(str(text).split())
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


# --------------------------------------------------------------------------------------------
# cells


@dataclass(frozen=True)
class Column:
    key: str  # key of an `aggregate_table` row
    header: str
    numeric: bool = True
    interval: str | None = None  # key of the half width shown as "± ..."


def columns(units: str | None = "K", task: bool = False, gpu: bool = False) -> list[Column]:
    """The case table's columns; `units` (of the target) goes into the error headers; `task`:
    a task column too (tables that mix tasks, as in a notebook); `gpu`: GPU utilisation and
    host-to-device copy time too (`shows_gpu`)."""
    u = f" [{units}]" if units else ""
    return [
        Column("case", "case", numeric=False),
        *([Column("task", "task", numeric=False)] if task else []),
        Column("library", "library", numeric=False),
        Column("status", "status", numeric=False),
        Column("rmse", f"RMSE{u}", interval="rmse_half_width"),
        Column(
            "rmse_over_noise_floor",
            "RMSE / noise floor",
            interval="rmse_over_noise_floor_half_width",
        ),
        Column("mae", f"MAE{u}"),
        Column("r2", "R²"),
        Column("bias", f"bias{u}"),
        Column("train_samples_per_s", "train samples/s", interval="train_samples_per_s_half_width"),
        Column("predict_samples_per_s", "predict samples/s"),
        Column("fit_s", "fit s", interval="fit_s_half_width"),
        Column("stall_percent", "stall %", interval="stall_percent_half_width"),
        Column("wait_percent", "wait %"),
        Column("read_amplification", "read ampl."),
        Column("ttq_seconds", TTQ_HEADER, interval="ttq_seconds_half_width"),
        Column("peak_rss_mb", "peak RSS MB"),
        *(GPU_COLUMNS if gpu else []),
    ]


GPU_COLUMNS = [
    Column("gpu_util_mean_pct", "GPU util %"),
    Column("gpu_util_p10_pct", "GPU util p10 %"),
    Column("h2d_copy_s", "H2D copy s"),
]


def shows_gpu(rows: Sequence[dict]) -> bool:
    """Whether a table of `rows` has the GPU columns: some result ran on CUDA."""
    return any(row.get("gpu_measured") for row in rows)


def units_of(rows: Sequence[dict]) -> str | None:
    """The target's units when every evaluated case agrees on them."""
    units = {row["units"] for row in rows if row.get("units")}
    return units.pop() if len(units) == 1 else None


def plus_minus(value: Any, half_width: Any) -> str:
    """ "mean ± half width", or the value alone where there is no interval."""
    if number(value) is None or number(half_width) is None:
        return fmt(value)
    return f"{fmt(value)} ± {fmt(half_width)}"


def status_text(row: dict) -> str:
    """ "ok", "failed: reason", "missing: ..." for one run; over repeats "ok (2 of 3); repeat 1
    failed: reason", the failed and missing repeats named."""
    status = row.get("status") or MISSING
    n = row.get("n_repeats") or 1
    if status == "missing" or "n_ok" not in row or n <= 1:
        reason = row.get("reason")
        if status in ("ok", "partial") or not reason:
            return "ok" if status == "partial" else status
        return f"{status}: {one_line(reason)}"
    head = f"ok ({row['n_ok']} of {n})" if row["n_ok"] else f"failed (all {n})"
    by_reason: dict[str, list[int]] = {}
    for failure in row.get("failed") or []:
        reason = one_line(failure.get("reason") or "no reason given")
        by_reason.setdefault(reason, []).append(failure.get("repeat") or 0)
    parts = [head]
    for reason, repeats in by_reason.items():
        parts.append(f"{_repeats(repeats)} failed: {reason}")
    if row.get("missing"):
        parts.append(f"{_repeats(row['missing'])} missing")
    return "; ".join(parts)


def _repeats(indices: Sequence[int]) -> str:
    return ("repeat " if len(indices) == 1 else "repeats ") + ", ".join(map(str, indices))


def ttq_text(row: dict) -> str:
    """Time to quality of a case: mean ± interval when every ok repeat got there, "never"
    when none did, "k of n only" in between, "—" when not measured."""
    if not row.get("n_ok") or not row.get("ttq_measured"):
        return MISSING
    reached, n = row.get("ttq_reached") or 0, row["n_ok"]
    if reached == 0:
        return "never"
    if reached < n:
        return f"{reached} of {n} only"
    return plus_minus(row.get("ttq_seconds"), row.get("ttq_seconds_half_width"))


def _cell(row: dict, column: Column) -> str:
    value = row.get(column.key)
    if column.key == "status":
        return status_text(row)
    if column.key == "ttq_seconds":
        return ttq_text(row)
    if not column.numeric:
        return MISSING if value is None else str(value)
    text = plus_minus(value, row.get(column.interval)) if column.interval else fmt(value)
    if column.key == "stall_percent" and value is not None:
        return (ESTIMATED_MARK if row.get("stall_method") == "estimated" else "") + text
    return text


def cells(rows: Sequence[dict], cols: Sequence[Column]) -> list[list[str]]:
    return [[_cell(row, c) for c in cols] for row in rows]


def transfer_cells(
    names: Sequence[str], rows: Sequence[dict], units: str | None
) -> tuple[list[str], list[list[str]]]:
    u = f" [{units}]" if units else ""
    headers = ["case", *[f"RMSE {n}{u}" for n in names], "transfer gain"]
    body = [
        [
            row["case"],
            *[plus_minus(row["rmse"].get(n), row["rmse_half_width"].get(n)) for n in names],
            plus_minus(row["transfer_gain"], row["transfer_gain_half_width"]),
        ]
        for row in rows
    ]
    return headers, body


def ranking_cells(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """The throughput ranking beside the time-to-quality ranking."""
    fast, quick = rankings(rows)
    headers = ["rank", "fastest: case", "train samples/s", "quickest to target: case", "s"]
    body = []
    for i in range(max(len(fast), len(quick))):
        f = fast[i] if i < len(fast) else None
        q = quick[i] if i < len(quick) else None
        body.append(
            [
                str(i + 1),
                f["case"] if f else "",
                plus_minus(f["train_samples_per_s"], f["train_samples_per_s_half_width"])
                if f
                else "",
                q["case"] if q else "",
                ttq_text(q) if q else "",
            ]
        )
    return headers, body


def comparison_cells(
    comparisons: Sequence[dict], units: str | None
) -> tuple[list[str], list[list[str]]]:
    headers = [
        "A",
        "B",
        "metric",
        "Δ mean (A − B)",
        "test",
        "n (A, B)",
        "p",
        "p (Holm)",
        f"significant (α = {ALPHA:g})",
    ]
    body = []
    for c in comparisons:
        label = f"{c['label']} [{units}]" if c["metric"] == "rmse" and units else c["label"]
        significant = {True: "yes ✱", False: "no", None: MISSING}[c["significant"]]
        body.append(
            [
                c["a"] + (" (twin)" if c["twin"] else ""),
                c["b"],
                label,
                fmt(c["difference"]),
                {"paired": "paired t", "welch": "Welch t"}.get(c["test"] or "", MISSING),
                f"{c['n_a']}, {c['n_b']}",
                _p(c["p"]),
                _p(c["p_adjusted"]),
                significant,
            ]
        )
    return headers, body


def _p(value: Any) -> str:
    x = number(value)
    if x is None:
        return MISSING
    return "< 0.001" if x < 0.001 else f"{x:.3f}"


# --------------------------------------------------------------------------------------------
# texts


def title(manifest: dict) -> tuple[str, list[tuple[str, str]]]:
    """The title and the (label, value) facts under it."""
    cube = manifest.get("cube")
    if isinstance(cube, dict):
        cube = cube.get("spec") or cube.get("path") or cube
    repeat = manifest.get("repeat")
    repeats = None
    if isinstance(repeat, int) and repeat > 1:
        seed = manifest.get("seed")
        seeds = f"seeds {seed}..{seed + repeat - 1}" if isinstance(seed, int) else "seeds"
        split = "split seed moves with them" if manifest.get("vary_split") else "one split"
        repeats = f"{repeat} per case ({seeds}; {split})"
    facts = [
        ("cube", cube),
        ("device", manifest.get("device")),
        ("started", manifest.get("started_at")),
        ("finished", manifest.get("finished_at")),
        ("epochs", manifest.get("epochs")),
        ("repeats", repeats),
    ]
    status = manifest.get("status")
    if status and status != "finished":  # still running, or interrupted
        facts.append(("run status", f"{status} (not finished)"))
    text = f"cubebench run {manifest.get('run_id', '?')}"
    return text, [(k, one_line(v, 200)) for k, v in facts if v is not None]


def environment_facts(env: dict | None) -> list[tuple[str, str]]:
    if not env:
        return [("environment", "not recorded")]
    facts = []
    python = env.get("python")
    if python:
        facts.append(("python", f"{python} ({env.get('implementation') or 'CPython'})"))
    cpu = env.get("cpu") if isinstance(env.get("cpu"), dict) else {}
    if cpu:
        count = f", {cpu['count']} logical cores" if cpu.get("count") else ""
        facts.append(("CPU", f"{cpu.get('model') or '?'}{count}"))
    gpu = env.get("gpu")
    if isinstance(gpu, dict):
        devices = gpu.get("devices") if isinstance(gpu.get("devices"), list) else []
        capability = get(devices[0], "compute_capability") if devices else None
        builds = gpu.get("cuda_builds") if isinstance(gpu.get("cuda_builds"), dict) else {}
        built = ", ".join(f"{k} {v}" for k, v in builds.items() if v)
        details = [
            f"driver {gpu['driver']}" if gpu.get("driver") else None,
            gpu.get("memory"),
            f"compute capability {capability}" if capability else None,
            f"built for CUDA: {built}" if built else None,
        ]
        details = ", ".join(str(d) for d in details if d)
        text = f"{gpu.get('count') or 1} × {gpu.get('name') or '?'}"
        facts.append(("GPU", text + (f" ({details})" if details else "")))
    elif "gpu" in env:
        facts.append(("GPU", "none"))
    threads = get(env, "threads", "per_case")
    if threads:
        facts.append(("threads per case", str(threads)))
    packages = env.get("packages") if isinstance(env.get("packages"), dict) else {}
    listed = [f"{name} {packages[name]}" for name in PACKAGES if packages.get(name)]
    if listed:
        facts.append(("packages", ", ".join(listed)))
    if env.get("platform"):
        facts.append(("platform", str(env["platform"])))
    facts.append(("git", str(env.get("git_sha") or "unknown")))
    images = env.get("images") if isinstance(env.get("images"), list) else []
    for image in images:  # a run joined across images: which case ran in which
        libraries = ", ".join(f"{k} {v}" for k, v in image.get("libraries", {}).items())
        text = f"{image.get('digest') or 'no image'} (lock {image.get('lock_hash') or '?'}"
        text += f"; {libraries})" if libraries else ")"
        facts.append(("image", f"{text}: {', '.join(image.get('cases', []))}"))
    digest = get(env, "image", "digest")
    if digest and not images:
        facts.append(("image", str(digest)))
    return [(k, one_line(v, 300)) for k, v in facts]


STALL_LEGEND = (
    "stall = training-loop time minus the compute time of the same steps on resident batches, "
    "over the fit time; can be negative within its interval; wait % (a separate column) = time "
    "measured inside next(batch), where the loop is ours"
)
READ_LEGEND = "read ampl. = decoded bytes / bytes of the cells the part covers"
GPU_LEGEND = (
    "GPU util % = mean of NVML's utilisation sampled during the fit, each reading the % of "
    "time in NVML's last sample period (1/6 s to 1 s by product) in which one or more kernels "
    "ran: busy, not full; p10 = its 10th percentile; H2D copy s = device "
    f"time of the training batches' host-to-device copies ({MISSING} where not measurable: "
    "Keras copies inside its step)"
)


def legend(rows: Sequence[dict], unit: str = "sample") -> str:
    """What the table's numbers are, and which intervals they carry."""
    if any((r.get("n_ok") or 0) >= 2 for r in rows):
        intervals = (
            "Values are mean ± half width of the 95 % interval (Student t) over the ok repeats "
            "of each case (a case with one ok repeat: no interval); failed repeats are counted "
            "and named in the status, never averaged in. "
        )
    else:
        intervals = (
            "Single run, no interval: each value is one repeat's (the stall's ± is its own "
            "measurement interval). "
        )
    sample = f"a sample is a {unit}" if unit != "sample" else "samples as the task counts them"
    text = (
        intervals + "RMSE, MAE and bias (prediction − truth) on the evaluated part, in the "
        "target's units; RMSE / noise floor: about 1 is the best any model can reach. Samples/s "
        f"over the fit and the prediction ({sample}); {STALL_LEGEND}"
    )
    if any(r.get("stall_method") == "estimated" for r in rows):
        text += f" ({ESTIMATED_MARK} estimated, not measured: a version 1 result)"
    gpu = f"; {GPU_LEGEND}" if shows_gpu(rows) else ""
    return (
        f"{text}; {READ_LEGEND}; {TTQ_HEADER}: training time until the validation RMSE first "
        f"reached {TTQ_FACTOR:g} × the noise floor (MLPerf's time to quality): never = not "
        f"reached, {MISSING} = not measured (no validation loss or no floor){gpu}."
    )


TRANSFER_LEGEND = (
    "RMSE of each predictor on the case's evaluated part (the target region); a case's own "
    "result is the first predictor it lists. Transfer gain = RMSE scratch / RMSE fine-tuned "
    "(> 1: pretraining helped)."
)
RANKING_LEGEND = (
    "Throughput ranking beside the time-to-quality ranking (MLPerf's headline: seconds of "
    "training to reach the target); cases that never reached it come last."
)
SIGNIFICANCE_LEGEND = (
    "Pairs of cases of different libraries (twins torch-X / keras-X first). p: two-sided "
    "t-test, paired by seed where both cases ran on the same seeds, else Welch's; adjusted with "
    f"Holm–Bonferroni within task and metric; ✱ significant at α = {ALPHA:g}; {MISSING}: no "
    "test possible (fewer than 2 ok repeats on a side, or no variance)."
)
ONE_REPEAT = (
    "One repeat per case: no interval and no significance test "
    "(run with `--repeat N`, N ≥ 2, to compare cases)."
)
NO_PAIRS = "No two cases of different libraries in this task: nothing to compare."


def section_heading(section: TaskSection) -> str:
    if section.task is NO_TASK:
        return "Cases without a result"
    return f"Task: {section.task}"


def split_line(section: TaskSection) -> str | None:
    """Which split the task's results were scored on (None for results from before the
    split kinds)."""
    if not section.splits:
        return None
    chunks = any(s.startswith("chunks") for s in section.splits)
    note = " (whole chunks: the test set depends on the cube's layout)" if chunks else ""
    return f"Split: {', '.join(section.splits)}{note}."


def _significance(section: TaskSection) -> str | None:
    """The one line that replaces the comparison table, if any."""
    if not section.comparisons:
        return NO_PAIRS
    if not section.repeated:
        return ONE_REPEAT
    return None


# --------------------------------------------------------------------------------------------
# Markdown


def _md_escape(text: str) -> str:
    """Text in a Markdown table cell: no pipes, no raw HTML."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def md_table(headers: Sequence[str], body: Sequence[Sequence[str]], numeric: Sequence[bool]) -> str:
    head = [_md_escape(h) for h in headers]
    rows = [[_md_escape(c) for c in row] for row in body]
    widths = [max(3, len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)
        )
        + "|"
    )
    return "\n".join([line(head), rule, *(line(row) for row in rows)])


def _md_section(section: TaskSection) -> list[str]:
    units = units_of(section.rows)
    cols = columns(units, gpu=shows_gpu(section.rows))
    out = [f"## {_md_escape(section_heading(section))}", ""]
    if split_line(section):
        out += [_md_escape(split_line(section)), ""]
    out.append(
        md_table([c.header for c in cols], cells(section.rows, cols), [c.numeric for c in cols])
    )
    if section.task is NO_TASK:
        return out
    out += ["", legend(section.rows, section.unit)]
    headers, body = ranking_cells(section.rows)
    if body:
        out += ["", "### Rankings", ""]
        out.append(md_table(headers, body, [True, False, True, False, True]))
        out += ["", RANKING_LEGEND]
    out += ["", "### Significance", ""]
    line = _significance(section)
    if line:
        out.append(line)
    else:
        headers, body = comparison_cells(section.comparisons, units)
        out.append(md_table(headers, body, [False] * 3 + [True] * 6))
        out += ["", SIGNIFICANCE_LEGEND]
    names, transfer = section.transfer
    if transfer:
        headers, body = transfer_cells(names, transfer, units)
        out += ["", "### Transfer learning", ""]
        out.append(md_table(headers, body, [False] + [True] * (len(headers) - 1)))
        out += ["", TRANSFER_LEGEND]
    out += ["", f"![{section.plot}]({section.plot})"]
    return out


def render_markdown(
    manifest: dict,
    sections: Sequence[TaskSection],
    env: dict | None,
    plots: Sequence[str] = (),
) -> str:
    """report.md: title, one section per task, the run-wide `plots`, the environment."""
    heading, facts = title(manifest)
    out = [f"# {_md_escape(heading)}", ""]
    out += [f"- **{k}**: {_md_escape(v)}" for k, v in facts]
    for section in sections:
        out += ["", *_md_section(section)]
    if plots:
        out += ["", "## Plots", ""]
        for name in plots:
            out += [f"![{name}]({name})", ""]
        out.pop()
    out += ["", "## Environment", ""]
    out += [f"- **{k}**: {_md_escape(v)}" for k, v in environment_facts(env)]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
h3 { font-size: 1.05em; margin-top: 1.2em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
tr.failed td, tr.missing td { color: #a00; } tr.partial td { color: #a60; }
p.legend { font-size: 0.85em; color: #555; max-width: 70em; }
img { max-width: 100%; margin: 0.5em 0; border: 1px solid #eee; }
ul.facts { list-style: none; padding-left: 0; } ul.facts li { margin: 0.15em 0; }
div.wide { max-width: 100%; overflow-x: auto; }
"""


def html_table(
    headers: Sequence[str],
    body: Sequence[Sequence[str]],
    numeric: Sequence[bool],
    row_classes: Sequence[str] | None = None,
) -> str:
    def cls(num: bool) -> str:
        return ' class="num"' if num else ""

    e = html.escape
    out = [
        '<div class="wide"><table>',  # a table wider than the page scrolls in its box
        "<tr>" + "".join(f"<th{cls(n)}>{e(h)}</th>" for h, n in zip(headers, numeric)) + "</tr>",
    ]
    for i, row in enumerate(body):
        klass = f' class="{e(row_classes[i])}"' if row_classes and row_classes[i] else ""
        tds = "".join(f"<td{cls(n)}>{e(c)}</td>" for c, n in zip(row, numeric))
        out.append(f"<tr{klass}>{tds}</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def facts_html(facts: Sequence[tuple[str, str]]) -> str:
    e = html.escape
    items = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in facts)
    return f'<ul class="facts">{items}</ul>'


def embedded_png(name: str, data: bytes) -> str:
    """An <img> holding the PNG itself: the page is one self-contained file."""
    encoded = base64.b64encode(data).decode("ascii")
    return f'<div><img alt="{html.escape(name)}" src="data:image/png;base64,{encoded}"></div>'


def _legend_html(text: str) -> str:
    return f'<p class="legend">{html.escape(text)}</p>'


def html_section(
    section: TaskSection, images: dict[str, bytes] | None = None, level: int = 2
) -> list[str]:
    """A task's section; `level`: its heading level (2 in the report, 4 in a notebook)."""
    e = html.escape
    h, sub = f"h{level}", f"h{level + 1}"
    units = units_of(section.rows)
    cols = columns(units, gpu=shows_gpu(section.rows))
    classes = [str(row.get("status") or "") for row in section.rows]
    parts = [
        f"<{h}>{e(section_heading(section))}</{h}>",
        *([f"<p>{e(split_line(section))}</p>"] if split_line(section) else []),
        html_table(
            [c.header for c in cols], cells(section.rows, cols), [c.numeric for c in cols], classes
        ),
    ]
    if section.task is NO_TASK:
        return parts
    parts.append(_legend_html(legend(section.rows, section.unit)))
    headers, body = ranking_cells(section.rows)
    if body:
        parts += [
            f"<{sub}>Rankings</{sub}>",
            html_table(headers, body, [True, False, True, False, True]),
            _legend_html(RANKING_LEGEND),
        ]
    parts.append(f"<{sub}>Significance</{sub}>")
    line = _significance(section)
    if line:
        parts.append(f"<p>{e(line)}</p>")
    else:
        headers, body = comparison_cells(section.comparisons, units)
        parts += [
            html_table(headers, body, [False] * 3 + [True] * 6),
            _legend_html(SIGNIFICANCE_LEGEND),
        ]
    names, transfer = section.transfer
    if transfer:
        headers, body = transfer_cells(names, transfer, units)
        parts += [
            f"<{sub}>Transfer learning</{sub}>",
            html_table(headers, body, [False] + [True] * (len(headers) - 1)),
            _legend_html(TRANSFER_LEGEND),
        ]
    if images and section.plot in images:
        parts.append(embedded_png(section.plot, images[section.plot]))
    return parts


def render_html(
    manifest: dict,
    sections: Sequence[TaskSection],
    env: dict | None,
    images: dict[str, bytes],
    plots: Sequence[str] = (),
) -> str:
    """The report as one self-contained page; `images` (file name -> PNG bytes) are embedded:
    each task's plot in its section, `plots` under "Plots"."""
    e = html.escape
    heading, facts = title(manifest)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(heading)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(heading)}</h1>",
        facts_html(facts),
    ]
    for section in sections:
        parts += html_section(section, images)
    shown = [name for name in plots if name in images]
    if shown:
        parts.append("<h2>Plots</h2>")
        parts += [embedded_png(name, images[name]) for name in shown]
    parts += ["<h2>Environment</h2>", facts_html(environment_facts(env)), "</body></html>"]
    return "\n".join(parts) + "\n"
