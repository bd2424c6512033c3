"""The reports as a reader sees them, in headless Chromium (tests/browser.py): the run report
and the compare report render, every image decodes, and nothing runs off the page: a table
fits, or scrolls inside its own box when the window is narrow."""

from __future__ import annotations

import os

import pytest

from browser import layout
from fake_cases import mean_case
from run_cli import run_cubebench

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # two suites and a compare first


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs of two cases, one of them a grid of two variants (long names in the table)."""
    cases = tmp_path_factory.mktemp("cases")
    (cases / "a.py").write_text(mean_case("mean-of-the-training-targets"))
    (cases / "b.py").write_text(mean_case("another-mean"))
    out = tmp_path_factory.mktemp("results")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    for run_id in ("first", "second"):
        proc = run_cubebench(
            "run", "--cube", "synthetic:tiny", "--cases-dir", str(cases), "--out", str(out),
            "--threads", "1", "--run-id", run_id, "--param", "mean-*.epochs=1,2",
            "--no-tracking", env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    compared = out / "compared"
    proc = run_cubebench("compare", str(out / "first"), str(out / "second"), "--out", str(compared))
    assert proc.returncode == 0, proc.stderr
    return out


def _nothing_off_the_page(page: dict) -> None:
    assert page["scroll_width"] <= page["page"], page  # the page never scrolls sideways
    for table in page["tables"]:
        assert table["right"] <= page["page"], table


def test_the_run_report_renders_its_plots_and_fits_a_1400_px_window(two_runs):
    page = layout(two_runs / "first" / "report.html", width=1400)
    assert len(page["images"]) >= 3 and all(image["ok"] for image in page["images"]), page
    assert page["tables"]
    _nothing_off_the_page(page)
    assert not any(table["scrolls"] for table in page["tables"])  # it fits: nothing to scroll


def test_in_a_narrow_window_a_wide_table_scrolls_in_its_box(two_runs):
    page = layout(two_runs / "first" / "report.html", width=700)
    _nothing_off_the_page(page)
    assert any(table["scrolls"] and table["width"] > page["page"] for table in page["tables"])


def test_the_compare_report_renders_its_plot_and_its_table(two_runs):
    page = layout(two_runs / "compared" / "compare.html", width=1400)
    assert [image["alt"] for image in page["images"]] == ["compare.png"]
    assert page["images"][0]["ok"]
    assert len(page["tables"]) == 1
    _nothing_off_the_page(page)
