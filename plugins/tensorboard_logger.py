"""TensorBoard logger (an observer): ``plugins: [tensorboard]`` in a suite.

Writes event files to ``<run folder>/tensorboard/`` (or ``log_dir``): every logged scalar (loss,
learning rate, tokens/s, sparsity, ...), validation loss and perplexity, the density of every
sparse weight and the mask turnover at each mask change, and the run's final figures. Observing
never changes what is trained, so adding it to a finished suite re-trains nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from sparsebench import hookimpl
from sparsebench.api import Method, final_scalars, finite, is_rank0, mask_scalars


MISSING = "the tensorboard logger needs the tensorboard package: pip install sparsebench[tensorboard]"


class TensorBoardLogger(Method):
    """Log a run to TensorBoard with ``torch.utils.tensorboard.SummaryWriter``."""

    name = "tensorboard"
    observer = True
    requires = {"tensorboard": "pip install sparsebench[tensorboard]"}

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        log_dir: Optional[str] = Field(None, description="event-file folder; default: <run folder>/tensorboard")
        flush_secs: int = Field(10, ge=1, description="seconds between writes of pending events to disk")

    def __init__(self, config: Optional[BaseModel] = None):
        super().__init__(config)
        self.writer: Any = None
        self.initial: dict = {}

    @hookimpl
    def configure(self, run) -> None:
        folder = self.config.log_dir or (Path(run.out_dir) / "tensorboard" if run.out_dir else None)
        if folder is None or not is_rank0():
            return  # a run trained in memory has nowhere to write; other ranks leave it to rank 0
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # used without a suite (a suite naming it is refused by validate)
            raise ImportError(MISSING) from None

        self.writer = SummaryWriter(log_dir=str(folder), flush_secs=self.config.flush_secs)
        self.writer.add_text("config", f"```\n{run.config.model_dump_json(indent=2)}\n```", 0)

    @hookimpl
    def on_train_start(self, run) -> None:
        self.initial = {n: m.clone() for n, m in run.masks.items()}
        self._masks(run, run.step)

    @hookimpl
    def on_log(self, run, step: int, record) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key not in ("step", "val_loss", "val_ppl") and finite(value):
                self.writer.add_scalar(_tag(key), value, step)

    @hookimpl
    def on_evaluate(self, run, step: int, metrics) -> None:
        if self.writer is not None:
            for key, value in metrics.items():
                if finite(value):
                    self.writer.add_scalar(f"val/{key.removeprefix('val_')}", value, step)

    @hookimpl
    def on_mask_change(self, run, step: int, old, new) -> None:
        self._masks(run, step)

    @hookimpl
    def on_run_end(self, run, summary) -> None:
        if self.writer is None:
            return
        for tag, value in final_scalars(summary).items():
            self.writer.add_scalar(tag, value, run.step)
        self.writer.close()
        self.writer = None

    def _masks(self, run, step: int) -> None:
        if self.writer is None or not run.masks:
            return
        for tag, value in mask_scalars(run, self.initial).items():
            self.writer.add_scalar(tag, value, step)


def _tag(key: str) -> str:
    return key if "/" in key else f"train/{key}"
