"""CSV logger (an observer): ``plugins: [csv]`` writes ``<run folder>/log.csv``.

Long format, one ``step,key,value`` row per number, so that metrics added by any plugin need no
change of header: loss, learning rate, tokens/s, sparsity, validation loss and perplexity, the
density of every sparse weight and the mask turnover at each mask change, and the final figures
(``final/<key>``). ``pandas.read_csv(...).pivot(index="step", columns="key", values="value")``
gives one column per metric.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from sparsebench import hookimpl
from sparsebench.api import Method, final_scalars, finite, is_rank0, mask_scalars


class CSVLogger(Method):
    """Append every logged number of a run to a CSV file."""

    name = "csv"
    observer = True

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        file: str = Field("log.csv", description="file name (relative to the run folder) or an absolute path")

    def __init__(self, config: Optional[BaseModel] = None):
        super().__init__(config)
        self.handle: Any = None
        self.writer: Any = None
        self.initial: dict = {}

    @hookimpl
    def configure(self, run) -> None:
        path = Path(self.config.file)
        if not path.is_absolute():
            if run.out_dir is None:
                return  # a run trained in memory has no folder to write into
            path = Path(run.out_dir) / path
        if not is_rank0():
            return
        new = not path.exists() or path.stat().st_size == 0
        self.handle = open(path, "a", encoding="utf-8", newline="")
        self.writer = csv.writer(self.handle)
        if new:
            self.writer.writerow(["step", "key", "value"])

    @hookimpl
    def on_train_start(self, run) -> None:
        self.initial = {n: m.clone() for n, m in run.masks.items()}
        self._masks(run, run.step)

    @hookimpl
    def on_log(self, run, step: int, record) -> None:
        self._write(step, {k: v for k, v in record.items() if k != "step"})

    @hookimpl
    def on_mask_change(self, run, step: int, old, new) -> None:
        self._masks(run, step)

    @hookimpl
    def on_run_end(self, run, summary) -> None:
        self._write(run.step, final_scalars(summary))
        if self.handle is not None:
            self.handle.close()
            self.handle = self.writer = None

    def _masks(self, run, step: int) -> None:
        if not run.masks:
            return
        self._write(step, mask_scalars(run, self.initial))

    def _write(self, step: int, values: dict) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if finite(value):
                self.writer.writerow([step, key, value])
        self.handle.flush()
