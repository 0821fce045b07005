"""Rich progress for a suite and for the run in progress (an observer plugin).

When the console is not a terminal (batch jobs, ``| tee``) a bar shows nothing until the end, so
the run's progress is printed as plain lines instead, at most every
``$SPARSEBENCH_PROGRESS_SECONDS`` seconds (default 30) and at the last step:
``<run> step 120/300 loss 3.412 12,345 tok/s ETA 0:01:10``.
"""

from __future__ import annotations

import datetime
import os
import time
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
        self.plain = not progress.console.is_terminal
        self.every = float(os.environ.get("SPARSEBENCH_PROGRESS_SECONDS", "30"))
        self.started: tuple[float, int] = (time.perf_counter(), 0)
        self.printed = -float("inf")

    @hookimpl
    def on_train_start(self, run) -> None:
        self.progress.console.print(f"{self.label}: {execution_header(run)}", highlight=False)  # the run header
        self.task = self.progress.add_task(self.label, total=run.total_steps, completed=run.step, info="")
        self.started = (time.perf_counter(), run.step)

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
        if self.plain:
            self._plain_line(run, step, record)

    def _plain_line(self, run, step: int, record) -> None:
        now = time.perf_counter()
        if now - self.printed < self.every and step < run.total_steps:
            return
        self.printed = now
        (t0, step0), done = self.started, step - self.started[1]
        eta = (now - t0) / done * (run.total_steps - step) if done > 0 else 0.0
        parts = [f"{self.label} step {step}/{run.total_steps}"]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        if "val_ppl" in record:
            parts.append(f"val ppl {record['val_ppl']:.2f}")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        parts.append(f"ETA {datetime.timedelta(seconds=round(eta))}")
        self.progress.console.print(" ".join(parts), highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
