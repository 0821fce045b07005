"""``rigl``: Rigging the Lottery, Evci et al. (2020)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sparsebench import Method, hookimpl
from sparsebench.api import (
    changed_only,
    cosine_drop_fraction,
    drop_lowest,
    fraction_step,
    grow_highest,
    map_layers,
    random_start,
    update_due,
)

DENSE_GRAD = "rigl_dense_grad"


class RigLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delta_t: int = Field(100, ge=1, description="ΔT: optimizer steps between topology updates")
    end_fraction: float = Field(0.75, gt=0, le=1, description="T_end as a fraction of training; no update after it")
    alpha: float = Field(0.3, gt=0, le=1, description="α: initial drop fraction, cosine-annealed to 0 at T_end")
    distribution: Literal["erk", "er", "uniform"] = Field("erk", description="initial per-layer density")
    erk_power_scale: float = Field(1.0, ge=0, le=1, description="RigL's erk_power_scale (1.0 = ERK)")


def rigl_update(mask, weight, grad, fraction: float):
    """One layer's RigL step: drop ``⌊fraction·n_active⌋`` smallest ``|w|``, grow as many largest
    ``|∇w|`` among the then-inactive positions (a just-dropped weight may come straight back)."""
    k = math.floor(fraction * int(mask.sum()))
    kept = drop_lowest(mask, weight.detach().abs(), k)
    return grow_highest(kept, grad.detach().abs(), k)


class RigL(Method):
    """Every ``delta_t`` steps until ``T_end = end_fraction · T``, each (logical) layer drops the
    ``⌊f(t)·n_active⌋`` active weights with the smallest magnitude and grows as many inactive ones
    with the largest dense-gradient magnitude, f(t) = α/2 · (1 + cos(π t / T_end)).

    Regrown weights start at zero and the harness resets **both** Adam moments of every changed
    position. The dense gradient that growing needs is charged at update steps as
    ``rigl_dense_grad`` = f_D − f_S per token, so an update step costs 2·f_S + f_D and a run's
    training FLOPs follow the paper's (3·f_S·ΔT + 2·f_S + f_D) / (ΔT + 1) per step.

    Evci, Gale, Menick, Castro, Elsen (2020), *Rigging the Lottery: Making All Tickets Winners*, ICML.
    """

    name = "rigl"
    Config = RigLConfig

    @hookimpl
    def init_mask(self, run, model):
        return random_start(run, self.config.distribution, self.config.erk_power_scale)

    @hookimpl
    def update_mask(self, run, step, masks):
        end_step = fraction_step(self.config.end_fraction, run.total_steps)
        if not update_due(step, self.config.delta_t, end_step):
            return None
        self.charge_dense_gradient(run, masks)
        fraction = cosine_drop_fraction(step, self.config.alpha, end_step)
        def update(layer, mask):  # per logical layer: c_attn's q, k and v keep their own counts
            grad = layer.grad()
            return mask.clone() if grad is None else rigl_update(mask, layer.weight(), grad, fraction)

        new = map_layers(masks, update, run.layers)
        changed = changed_only(masks, new)
        run.log(**{"rigl/drop_fraction": fraction,
                   "rigl/n_swapped": sum(int((new[n] & ~masks[n]).sum()) for n in changed)})
        return changed or None

    @staticmethod
    def charge_dense_gradient(run, masks) -> None:
        """The weight gradient of an update step is dense: f_D − f_S more than a sparse step."""
        tokens = run.tokens_per_step
        densities = {n: float(m.float().mean()) for n, m in masks.items()}
        run.ledger.charge(DENSE_GRAD, run.ledger.forward_cost(tokens) - run.ledger.forward_cost(tokens, densities))
