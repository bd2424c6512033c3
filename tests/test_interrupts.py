"""Ctrl-C that is never lost (`cubebench.interrupts`): a KeyboardInterrupt swallowed where it
landed (a finalizer, a library catching everything) is raised again by the next wait or before
the next commit. Each check runs in its own interpreter: signal handlers are process-wide."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SWALLOW = """
import os, signal
from cubebench import interrupts

interrupts.install()

def swallowed():
    # what a __del__ or a catch-all in a library does with the exception
    try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10**6):
            pass  # the handler runs here, between bytecodes
    except KeyboardInterrupt:
        pass

swallowed()
assert interrupts.interrupted()
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_wait_raises_an_interrupt_that_was_swallowed():
    proc = _python(
        SWALLOW
        + """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
start = time.monotonic()
try:
    interrupts.wait(child, timeout=60)
except KeyboardInterrupt:
    print(f"raised after {time.monotonic() - start:.2f} s")
finally:
    child.kill()
"""
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("raised after 0.")  # at once, not after the 60 s


def test_a_wait_times_out_as_subprocess_does():
    proc = _python(
        """
import subprocess, sys
from cubebench import interrupts
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
try:
    interrupts.wait(child, timeout=0.5)
except subprocess.TimeoutExpired:
    print("timed out")
finally:
    child.kill()
print(interrupts.wait(child))
"""
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["timed", "out", "-9"]


def test_an_interrupted_rechunk_commits_nothing_even_if_the_interrupt_was_swallowed(tmp_path):
    """The copy finishes (the interrupt was lost on the way), and still nothing is put in
    place: the check before the commit raises it again, the temporary copy is removed."""
    dst = tmp_path / "dst.zarr"
    proc = _python(
        SWALLOW
        + """
import sys
from pathlib import Path
from cubebench.cube.rechunk import _write_atomically
dst = Path(sys.argv[1])
try:
    _write_atomically(dst, lambda tmp: (tmp / "zarr.json").write_text("{}"))
except KeyboardInterrupt:
    print("interrupted")
""",
        str(dst),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "interrupted"
    assert list(tmp_path.iterdir()) == []


def test_the_cli_does_not_report_success_after_a_swallowed_interrupt(tmp_path):
    """A command that completes after its interrupt was swallowed exits 130, not 0."""
    script = tmp_path / "swallowing.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal, sys
            from cubebench import cli

            def listing(args):
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    for _ in range(10**6):
                        pass
                except KeyboardInterrupt:
                    pass  # swallowed
                return 0

            parser = cli.build_parser
            def build_parser():
                p = parser()
                p._subparsers._group_actions[0].choices["list"].set_defaults(func=listing)
                return p
            cli.build_parser = build_parser
            sys.exit(cli.main(["list"]))
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "cubebench: interrupted"
    assert Path(script).exists()
