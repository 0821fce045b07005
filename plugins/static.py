"""``static``: a random mask drawn at initialisation and kept for the whole run."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sparsebench import Method, hookimpl
from sparsebench.api import random_start


class StaticConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    distribution: Literal["uniform", "erk", "er"] = Field(
        "erk", description="uniform: every layer at the target; erk: Erdős–Rényi-Kernel (RigL paper); er: Erdős–Rényi (SET paper)"
    )
    erk_power_scale: float = Field(1.0, ge=0, le=1, description="RigL's erk_power_scale (1.0 = ERK)")


class Static(Method):
    """Random masks at the target sparsity, drawn from ``run.generator`` and never changed.

    Follows the "static sparse" baseline of Evci et al. (2020), *Rigging the Lottery*.
    """

    name = "static"
    Config = StaticConfig

    @hookimpl
    def init_mask(self, run, model):
        return random_start(run, self.config.distribution, self.config.erk_power_scale)
