"""``magnitude``: one-shot magnitude pruning — train dense, prune once, fine-tune the rest."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sparsebench import hookimpl
from sparsebench.methods import Method
from sparsebench_plugins._dst import changed_only, drop_lowest, drop_lowest_global, fraction_step


class MagnitudeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prune_at: float = Field(0.5, gt=0, lt=1, description="fraction of training at which the weights are pruned")
    scope: Literal["global", "layer"] = Field(
        "global", description="global: one |w| threshold over every sparsifiable weight; layer: each layer at the target"
    )


def magnitude_masks(weights, masks, sparsity: float, scope: str) -> dict:
    """Masks keeping the largest ``|w|`` among the active weights at ``sparsity``.

    ``layer``: every layer keeps ``round((1 - sparsity) · numel)`` weights. ``global``: the
    layers together keep ``round((1 - sparsity) · N)``. Exactly the masks of
    ``torch.nn.utils.prune.l1_unstructured`` / ``global_unstructured(L1Unstructured)`` with the
    same number of weights to prune (the same ``topk(largest=False)`` picks them).
    """
    scores = {n: weights[n].detach().abs() for n in masks}
    if scope == "layer":
        out = {}
        for name, mask in masks.items():
            keep = round((1.0 - sparsity) * mask.numel())
            out[name] = drop_lowest(mask, scores[name], int(mask.sum()) - keep)
        return out
    total = sum(m.numel() for m in masks.values())
    active = sum(int(m.sum()) for m in masks.values())
    keep = round((1.0 - sparsity) * total)
    return drop_lowest_global(scores, masks, active - keep)


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
        new = magnitude_masks(run.sparsifiable, masks, run.sparsity, self.config.scope)
        return changed_only(masks, new) or None
