"""``static``: a random mask drawn at initialisation and kept for the whole run."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sparsebench import hookimpl
from sparsebench.masks import er_densities, erk_densities, random_masks, uniform_densities
from sparsebench.methods import Method


def layer_densities(distribution: str, layers, sparsity: float, power_scale: float = 1.0) -> dict[str, float]:
    """Per-layer densities of a distribution name (shared by every method with a random start)."""
    if distribution == "uniform":
        return uniform_densities(layers, sparsity)
    if distribution == "erk":
        return erk_densities(layers, sparsity, power_scale=power_scale)
    if distribution == "er":
        return er_densities(layers, sparsity)
    raise ValueError(f"unknown distribution '{distribution}'. Allowed: uniform, erk, er")


def random_start(run, distribution: str, power_scale: float = 1.0) -> dict:
    """Random masks at ``run.sparsity`` with the layer densities of ``distribution``, drawn from
    ``run.generator``: the initial masks of every method that starts from a random sparse mask."""
    return random_masks(run.layers, layer_densities(distribution, run.layers, run.sparsity, power_scale), run.generator)


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
