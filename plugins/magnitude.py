"""``magnitude``: one-shot magnitude pruning — train dense, prune once, fine-tune the rest."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sparsebench import Method, hookimpl
from sparsebench.api import changed_only, fraction_step, magnitude_masks


class MagnitudeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prune_at: float = Field(0.5, gt=0, lt=1, description="fraction of training at which the weights are pruned")
    scope: Literal["global", "layer"] = Field(
        "global", description="global: one |w| threshold over every sparsifiable weight; layer: each layer at the target"
    )


class Magnitude(Method):
    """One-shot magnitude pruning after dense training (Han et al., 2015; Zhu & Gupta's baseline).

    The model trains dense until step ``round(prune_at · total_steps)``; at that step the
    smallest-magnitude weights are removed down to the target sparsity (globally or per layer),
    and the remaining steps fine-tune the sparse model. Training FLOPs are dense before the prune
    and sparse after it.
    """

    name = "magnitude"
    Config = MagnitudeConfig
    changes_density = True

    @hookimpl
    def update_mask(self, run, step, masks):
        if step != fraction_step(self.config.prune_at, run.total_steps):
            return None
        new = magnitude_masks(run.sparsifiable, masks, run.sparsity, self.config.scope, run.layers)
        return changed_only(masks, new) or None
