"""``gmp``: gradual magnitude pruning with the cubic schedule of Zhu & Gupta (2017)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sparsebench import Method, hookimpl
from sparsebench.api import changed_only, fraction_step, magnitude_masks


class GMPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="s_i, the sparsity of the first pruning step")
    start_fraction: float = Field(0.1, ge=0, lt=1, description="t0 as a fraction of training")
    end_fraction: float = Field(0.75, gt=0, le=1, description="last pruning step as a fraction of training")
    delta_t: int = Field(100, ge=1, description="Δt: optimizer steps between pruning steps")
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: every layer follows the schedule (the paper); global: one threshold"
    )

    @model_validator(mode="after")
    def _ordered(self) -> "GMPConfig":
        if self.end_fraction < self.start_fraction:
            raise ValueError(f"end_fraction ({self.end_fraction}) is before start_fraction ({self.start_fraction})")
        return self


class GMPSchedule:
    """s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³ for t ∈ {t0, t0+Δt, …, t0+nΔt}.

    ``t0 = round(start_fraction · T)`` (at least 1) and ``n = ⌊(t_end − t0)/Δt⌋`` with
    ``t_end = round(end_fraction · T)``, so the last pruning step ``t0 + nΔt`` is the last grid
    point not after ``t_end``. When ``t_end − t0 < Δt`` (n = 0) there is one pruning step, at
    t0, straight to s_f.
    """

    def __init__(self, config: GMPConfig, total_steps: int, final_sparsity: float):
        self.s_i, self.s_f, self.delta_t = config.initial_sparsity, final_sparsity, config.delta_t
        self.t0 = fraction_step(config.start_fraction, total_steps)
        t_end = max(self.t0, round(config.end_fraction * total_steps))
        self.n = (t_end - self.t0) // self.delta_t

    @property
    def steps(self) -> list[int]:
        """Every pruning step, in order."""
        return [self.t0 + i * self.delta_t for i in range(self.n + 1)]

    def is_pruning_step(self, step: int) -> bool:
        return self.t0 <= step <= self.t0 + self.n * self.delta_t and (step - self.t0) % self.delta_t == 0

    def sparsity(self, step: int) -> float:
        """Target sparsity after the pruning step ``step`` (0 before t0, s_f after the last)."""
        if step < self.t0:
            return 0.0  # dense until the first pruning step
        if self.n == 0 or step >= self.t0 + self.n * self.delta_t:
            return self.s_f
        progress = (step - self.t0) / (self.n * self.delta_t)
        return self.s_f + (self.s_i - self.s_f) * (1.0 - progress) ** 3


class GMP(Method):
    """Gradual magnitude pruning, Zhu & Gupta (2017), *To prune, or not to prune*.

    The model starts dense. At every pruning step the smallest-magnitude active weights are
    removed until the sparsity equals the cubic schedule's s_t (per layer by default, as in the
    paper; ``scope: global`` ranks all layers together). Pruned weights stay pruned.
    """

    name = "gmp"
    Config = GMPConfig
    changes_density = True

    def __init__(self, config=None):
        super().__init__(config)
        self.schedule: GMPSchedule | None = None

    @hookimpl
    def configure(self, run):
        if self.config.initial_sparsity > run.sparsity:
            raise ValueError(
                f"gmp.initial_sparsity ({self.config.initial_sparsity}) exceeds the target sparsity ({run.sparsity})"
            )
        self.schedule = GMPSchedule(self.config, run.total_steps, run.sparsity)

    @hookimpl
    def update_mask(self, run, step, masks):
        if not self.schedule.is_pruning_step(step):
            return None
        target = self.schedule.sparsity(step)
        # Only active weights are ranked and none is regrown: pruned weights stay pruned.
        changed = changed_only(masks, magnitude_masks(run.sparsifiable, masks, target, self.config.scope, run.layers))
        run.log(**{"gmp/sparsity_target": target})
        return changed or None
