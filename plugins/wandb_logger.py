"""Weights & Biases logger (an observer): ``plugins: [{wandb: {project: my-project}}]``.

Offline by default (``mode: offline``: files under ``<run folder>/wandb``, no network; upload
later with ``wandb sync``). Logs every logged scalar (loss, learning rate, tokens/s, sparsity,
validation loss and perplexity), the density of every sparse weight and the mask turnover at each
mask change, and the final figures as the W&B run summary. Needs ``pip install sparsebench[wandb]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from sparsebench import hookimpl
from sparsebench.api import Method, final_scalars, finite, is_rank0, mask_scalars

MISSING = "the wandb logger needs the wandb package: pip install sparsebench[wandb]"


class WandbLogger(Method):
    """Log a run to Weights & Biases (offline unless ``mode: online``)."""

    name = "wandb"
    observer = True
    requires = {"wandb": "pip install sparsebench[wandb]"}  # validate refuses a suite naming it without wandb

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        project: str = Field("sparsebench", description="W&B project name")
        entity: Optional[str] = Field(None, description="W&B team or user (default: yours)")
        mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline needs no network")
        dir: Optional[str] = Field(None, description="folder of W&B's files; default: the run folder")

    def __init__(self, config: Optional[BaseModel] = None):
        super().__init__(config)
        self.wb: Any = None
        self.initial: dict = {}

    @hookimpl
    def configure(self, run) -> None:
        if not is_rank0():
            return
        try:
            import wandb
        except ImportError:
            raise ImportError(MISSING) from None
        folder = self.config.dir or (str(run.out_dir) if run.out_dir else None)
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
        cfg = run.config
        self.wb = wandb.init(project=self.config.project, entity=self.config.entity, mode=self.config.mode,
                             dir=folder, name=cfg.run_id or None, group=cfg.suite, id=cfg.run_id or None,
                             config=cfg.model_dump(mode="json", by_alias=True), reinit=True, resume="allow")

    @hookimpl
    def on_train_start(self, run) -> None:
        self.initial = {n: m.clone() for n, m in run.masks.items()}
        self._masks(run, run.step)

    @hookimpl
    def on_log(self, run, step: int, record) -> None:
        self._log({k: v for k, v in record.items() if k != "step"}, step)

    @hookimpl
    def on_mask_change(self, run, step: int, old, new) -> None:
        self._masks(run, step)

    @hookimpl
    def on_run_end(self, run, summary) -> None:
        if self.wb is None:
            return
        for key, value in final_scalars(summary).items():
            self.wb.summary[key] = value
        self.wb.finish()
        self.wb = None

    def _masks(self, run, step: int) -> None:
        if self.wb is None or not run.masks:
            return
        self._log(mask_scalars(run, self.initial), step)

    def _log(self, values: dict, step: int) -> None:
        if self.wb is not None:
            numbers = {k: v for k, v in values.items() if finite(v)}
            if numbers:
                self.wb.log(numbers, step=step)
