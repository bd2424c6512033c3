"""A page as headless Chromium lays it out (Debian's `chromium`, no driver): a script added to
a copy of the page records, once it has loaded, whether every image decoded and where every
table ends, and `--dump-dom` hands that record back."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

CHECK = """<script>
window.addEventListener("load", () => {
  const page = document.documentElement.clientWidth;
  const images = [...document.images].map((i) => ({
    alt: i.alt, ok: i.complete && i.naturalWidth > 0}));
  const tables = [...document.querySelectorAll("table")].map((t) => {
    const box = t.closest("div.wide");  // a box that scrolls a wide table
    const scrolls = box !== null && box.scrollWidth > box.clientWidth;
    const shown = (scrolls ? box : t).getBoundingClientRect();
    return {right: Math.round(shown.right), width: Math.round(t.getBoundingClientRect().width),
            scrolls};
  });
  const record = {page, scroll_width: document.documentElement.scrollWidth, images, tables};
  document.body.setAttribute("data-layout", JSON.stringify(record));
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def layout(page: Path, width: int = 1400, height: int = 900) -> dict:
    """{page, scroll_width, images: [{alt, ok}], tables: [{right, width, scrolls}]} of `page`
    in a `width` x `height` window."""
    copy = page.with_name(f".layout-{page.name}")
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"))
    try:
        dom = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--window-size={width},{height}", "--virtual-time-budget=10000",
             f"--user-data-dir={page.parent / '.chromium'}", "--dump-dom", copy.as_uri()],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
    finally:
        copy.unlink(missing_ok=True)
    found = re.search(r'data-layout="([^"]*)"', dom)
    assert found, dom[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
