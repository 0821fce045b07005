"""Rich progress for a suite and for the run in progress (an observer plugin)."""

from __future__ import annotations

from typing import Any, Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sparsebench import hookimpl
from sparsebench.run_setup import execution_header


def make_progress(console: Optional[Console] = None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class RunProgress:
    """Observer: advances the current run's bar and shows loss and tokens/s at each log step."""

    name = "progress"
    observer = True

    def __init__(self, progress: Progress, label: str):
        self.progress = progress
        self.label = label
        self.task: Optional[Any] = None

    @hookimpl
    def on_train_start(self, run) -> None:
        self.progress.console.print(f"{self.label}: {execution_header(run)}", highlight=False)  # the run header
        self.task = self.progress.add_task(self.label, total=run.total_steps, completed=run.step, info="")

    @hookimpl
    def on_log(self, run, step: int, record) -> None:
        parts = []
        if "loss" in record:
            parts.append(f"loss {record['loss']:.3f}")
        if "val_ppl" in record:
            parts.append(f"val ppl {record['val_ppl']:.2f}")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if self.task is not None:
            self.progress.update(self.task, completed=step, info=" · ".join(parts))

    def close(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
