"""``burn_in``: newly activated weights — and only those — take larger steps for a few updates.

For ``burn_in_steps`` optimizer steps after a mask change (the step of the change included), the
update of every regrown weight is scaled by a learning-rate multiplier rising linearly from 1.0
to ``burn_in_lr_mult``. With AdamW, scaling a weight's step is exactly scaling its learning rate
(both the Adam term and the decoupled weight decay are proportional to lr), so the component
snapshots the new positions before ``optimizer.step()`` and rescales their change afterwards:
``w ← w_before + mult · (w_after − w_before)``. Every other weight, and the optimizer state, is
untouched — unlike scaling whole gradient tensors, which would also change the old weights' steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from sparsebench import Method, hookimpl


class BurnInConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    burn_in_steps: int = Field(5, ge=0, description="updates with a raised learning rate for new weights (0: off)")
    burn_in_lr_mult: float = Field(1.5, gt=0, description="learning-rate multiplier reached at the last burn-in step")


def burn_in_multiplier(k: int, steps: int, final: float) -> float:
    """Multiplier of the ``k``-th (0-based) burn-in step: 1.0 → ``final`` linearly over ``steps``.

    A one-step burn-in uses ``final``.
    """
    if steps <= 1:
        return final
    return 1.0 + (final - 1.0) * k / (steps - 1)


@dataclass
class Cohort:
    """The positions regrown by one mask change."""

    start: int  # the step of the change: its first burn-in step
    positions: dict[str, torch.Tensor]  # layer → flat indices


class BurnIn(Method):
    """Mini burn-in of regrown connections (works after any mask-changing method)."""

    name = "burn_in"
    Config = BurnInConfig

    def __init__(self, config: Optional[BurnInConfig] = None):
        super().__init__(config)
        self.cohorts: list[Cohort] = []
        self._before: list[tuple[Cohort, str, torch.Tensor]] = []

    @hookimpl
    def on_mask_change(self, run, step, old, new):
        regrown = {}
        for name, mask in new.items():
            fresh = (mask & ~old[name]).view(-1)
            # A position pruned since, or regrown again, leaves its older cohort.
            for cohort in self.cohorts:
                if name in cohort.positions:
                    idx = cohort.positions[name]
                    cohort.positions[name] = idx[mask.view(-1)[idx] & ~fresh[idx]]
            idx = torch.nonzero(fresh).view(-1)
            if idx.numel():
                regrown[name] = idx
        if regrown and self.config.burn_in_steps > 0:
            self.cohorts.append(Cohort(step, regrown))

    def _multiplier(self, cohort: Cohort, step: int) -> float:
        return burn_in_multiplier(step - cohort.start, self.config.burn_in_steps, self.config.burn_in_lr_mult)

    @hookimpl
    def before_optimizer_step(self, run, step):
        self.cohorts = [c for c in self.cohorts if step - c.start < self.config.burn_in_steps]
        self._before = []
        for cohort in self.cohorts:
            if self._multiplier(cohort, step) == 1.0:
                continue  # nothing to rescale (the first step of the default schedule)
            for name, idx in cohort.positions.items():
                flat = run.sparsifiable[name].detach().view(-1)
                cohort.positions[name] = idx = idx.to(flat.device)  # restored state is on the CPU
                self._before.append((cohort, name, flat[idx].clone()))

    @hookimpl
    def after_optimizer_step(self, run, step):
        with torch.no_grad():
            for cohort, name, before in self._before:
                idx = cohort.positions[name]
                flat = run.sparsifiable[name].detach().view(-1)
                flat[idx] = before + self._multiplier(cohort, step) * (flat[idx] - before)
        self._before = []

    def state_dict(self):
        return {"cohorts": [{"start": c.start, "positions": {n: i.cpu() for n, i in c.positions.items()}}
                            for c in self.cohorts]}

    def load_state_dict(self, state):
        self.cohorts = [Cohort(int(c["start"]), dict(c["positions"])) for c in state["cohorts"]]
