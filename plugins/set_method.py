"""``set``: Sparse Evolutionary Training, Mocanu et al. (2018)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from sparsebench import Method, hookimpl
from sparsebench.api import changed_only, drop_lowest, fraction_step, grow_random, map_layers, random_start, update_due


class SETConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    zeta: float = Field(0.3, gt=0, lt=1, description="ζ: fraction of the active weights removed and regrown per update")
    delta_t: int = Field(100, ge=1, description="optimizer steps between topology updates (the paper: one epoch)")
    end_fraction: float = Field(1.0, gt=0, le=1, description="no update at or after this fraction of training")
    variant: Literal["original", "magnitude"] = Field(
        "original",
        description="original: ζ of the positive and ζ of the negative weights closest to zero, separately "
        "(Mocanu's code); magnitude: ζ of all active weights by |w|",
    )
    distribution: Literal["er", "erk", "uniform"] = Field("er", description="initial per-layer density (the paper: er)")


def set_drop(mask: torch.Tensor, weight: torch.Tensor, zeta: float, variant: str) -> torch.Tensor:
    """The mask after SET's removal step (nothing regrown yet).

    ``magnitude``: the ``⌊ζ·n_active⌋`` active weights with the smallest ``|w|``.
    ``original``: the ``⌊ζ·n_pos⌋`` smallest positive and the ``⌊ζ·n_neg⌋`` largest negative
    active weights, each sign on its own (active weights exactly 0 count as negative, closest to
    zero). Mocanu's code finds the same two sets with thresholds on the sorted weights, whose
    index arithmetic removes one or two weights more per sign than ⌊ζ·n⌋; the counts here are the
    rule as the paper states it.
    """
    w = weight.detach()
    if variant == "magnitude":
        return drop_lowest(mask, w.abs(), math.floor(zeta * int(mask.sum())))
    positive = mask & (w > 0)
    negative = mask & ~positive
    kept_pos = drop_lowest(positive, w, math.floor(zeta * int(positive.sum())))
    kept_neg = drop_lowest(negative, -w, math.floor(zeta * int(negative.sum())))
    return kept_pos | kept_neg


class SET(Method):
    """Every ``delta_t`` steps, remove a fraction ζ of each (logical) layer's active weights and regrow as
    many at uniformly random inactive positions (just-removed ones included, as in the original
    code). Regrown weights start at zero with fresh optimizer state. The initial masks are random
    with Erdős–Rényi layer densities, as in the paper.

    Mocanu, Mocanu, Stone, Nguyen, Gibescu, Liotta (2018), *Scalable training of artificial neural
    networks with adaptive sparse connectivity inspired by network science*, Nature Communications.
    """

    name = "set"
    Config = SETConfig

    @hookimpl
    def init_mask(self, run, model):
        return random_start(run, self.config.distribution)

    @hookimpl
    def update_mask(self, run, step, masks):
        if not update_due(step, self.config.delta_t, fraction_step(self.config.end_fraction, run.total_steps)):
            return None
        def update(layer, mask):  # per logical layer: c_attn's q, k and v keep their own counts
            kept = set_drop(mask, layer.weight(), self.config.zeta, self.config.variant)
            return grow_random(kept, int(mask.sum()) - int(kept.sum()), run.generator)

        new = map_layers(masks, update, run.layers)
        changed = changed_only(masks, new)
        run.log(**{"set/n_swapped": sum(int((new[n] & ~masks[n]).sum()) for n in changed)})
        return changed or None
