"""Progress bars for `cubebench run`: one for the suite (cases), one for the running case
(epochs), fed by the workers' JSON events. Quiet when stderr is not a terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cubebench.errors import CubebenchError


class SuiteProgress:
    def __init__(self, cases: list[str]):
        self.console = Console(stderr=True)
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=self.console,
            transient=False,
        )
        self.suite = self.bars.add_task("suite", total=len(cases), note="")
        self.case_bar: Any = None

    def __enter__(self) -> SuiteProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if isinstance(exc[1], CubebenchError):  # a user mistake: its one line, no bars above it
            self.bars.live.transient = True
        self.bars.__exit__(*exc)

    def warn(self, message: str) -> None:
        """One line above the bars (stderr)."""
        self.console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)

    def __call__(self, case: str, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            self.case_bar = self.bars.add_task(f"  {case}", total=None, note="starting")
        elif kind == "phase" and self.case_bar is not None:
            self.bars.update(self.case_bar, note=event.get("phase", ""))
        elif kind == "epoch" and self.case_bar is not None:
            loss = event.get("train_loss")
            note = f"epoch {event['epoch'] + 1}" + (f", loss {loss:.4g}" if loss else "")
            total = event.get("of") or None
            self.bars.update(self.case_bar, completed=event["epoch"] + 1, total=total, note=note)
        elif kind == "end":
            status = event.get("status")
            note = "ok" if status == "ok" else f"[red]failed: {escape(str(event.get('reason')))}"
            if self.case_bar is not None:
                self.bars.update(self.case_bar, note=note)
                self.bars.stop_task(self.case_bar)
            self.bars.advance(self.suite)
