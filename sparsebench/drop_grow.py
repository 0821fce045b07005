"""Drop/grow building blocks for methods that change masks (public: re-exported by ``sparsebench.api``).

The first-party methods (SET, RigL, GMP, magnitude, Gumbel) are built from these, and a
third-party method may use them the same way::

    from sparsebench.api import changed_only, drop_lowest, grow_highest

Every function works on bool masks (``True`` = active) and returns **new** masks; nothing is
modified in place, so a method may hand ``run.masks`` straight in. Counts are exact:
``drop_lowest(mask, score, k)`` has exactly ``k`` fewer active entries (``k`` is clamped to the
active count), ``grow_highest`` exactly ``k`` more (clamped to the inactive count).
Ties are broken by ``torch.topk``, which is deterministic on a given device.

**Logical layers.** A fused weight (GPT-2's ``attn.c_attn`` = q | k | v) is several layers.
The per-tensor functions (:func:`drop_lowest`, :func:`grow_highest`, ...) work on whatever
tensor they are given; to keep a count per logical layer, apply them through
:func:`map_layers`, which hands ``fn`` each logical layer and its slice of the mask::

    new = map_layers(masks, lambda layer, mask: drop_lowest(mask, layer.weight().abs(), k), run.layers)

The functions that take whole mask dicts (:func:`magnitude_masks` with ``scope="layer"``)
iterate logical layers themselves.

Schedules count optimizer steps (``run.total_steps``), never micro-batches.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from sparsebench.logical_layers import map_layers

__all__ = [
    "map_layers",
    "update_due",
    "fraction_step",
    "cosine_drop_fraction",
    "drop_lowest",
    "grow_highest",
    "grow_random",
    "keep_top",
    "keep_top_global",
    "drop_lowest_global",
    "changed_only",
    "magnitude_masks",
]


def fraction_step(fraction: float, total_steps: int) -> int:
    """The optimizer step at ``fraction`` of training: ``round(fraction · total_steps)``, at least 1."""
    return max(1, round(fraction * total_steps))


def update_due(step: int, delta_t: int, end_step: int) -> bool:
    """A topology update happens at every ``delta_t``-th optimizer step strictly before ``end_step``.

    "Strictly before": RigL's drop fraction is 0 at ``end_step`` anyway, and a method that runs
    to the end of training (SET) must not regrow zero-valued weights on the very last step.
    """
    return step % delta_t == 0 and step < end_step


def cosine_drop_fraction(step: int, alpha: float, end_step: int) -> float:
    """RigL's update schedule f(t) = α/2 · (1 + cos(π t / T_end)), 0 from ``end_step`` on."""
    if step >= end_step:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / end_step))


def _flat_topk(score: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    return torch.topk(score.reshape(-1), k, largest=largest, sorted=False).indices


def drop_lowest(mask: torch.Tensor, score: torch.Tensor, k: int) -> torch.Tensor:
    """Deactivate the ``k`` active entries with the lowest ``score`` (e.g. ``|w|``)."""
    k = min(int(k), int(mask.sum()))
    if k <= 0:
        return mask.clone()
    masked = score.detach().float().masked_fill(~mask, math.inf)  # inactive entries are never picked
    new = mask.clone().reshape(-1)
    new[_flat_topk(masked, k, largest=False)] = False
    return new.view_as(mask)


def grow_highest(mask: torch.Tensor, score: torch.Tensor, k: int) -> torch.Tensor:
    """Activate the ``k`` inactive entries with the highest ``score`` (e.g. ``|∇w|``)."""
    k = min(int(k), int((~mask).sum()))
    if k <= 0:
        return mask.clone()
    masked = score.detach().float().masked_fill(mask, -math.inf)  # active entries are never picked
    new = mask.clone().reshape(-1)
    new[_flat_topk(masked, k, largest=True)] = True
    return new.view_as(mask)


def grow_random(mask: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Activate ``k`` inactive entries drawn uniformly at random from ``generator``.

    The top-``k`` of i.i.d. uniform scores is a uniform ``k``-subset. The scores are drawn on the
    generator's device (``run.generator`` is a CPU generator) so a run draws the same positions
    on any device.
    """
    score = torch.rand(mask.numel(), generator=generator, device=generator.device).to(mask.device)
    return grow_highest(mask, score.view_as(mask), k)


def keep_top(score: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """A mask with exactly the ``k`` highest-``score`` entries active (only among ``allowed``)."""
    masked = score.detach().float()
    if allowed is not None:
        masked = masked.masked_fill(~allowed, -math.inf)
        k = min(int(k), int(allowed.sum()))
    new = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        new[_flat_topk(masked, int(k), largest=True)] = True
    return new.view_as(score)


def keep_top_global(
    scores: Mapping[str, torch.Tensor], k: int, allowed: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Masks with exactly the ``k`` highest scores over all layers together active.

    The layers are concatenated in the mapping's order before one ``topk``, as
    ``torch.nn.utils.prune.global_unstructured`` does, so ties resolve the same way.
    """
    names = list(scores)
    flat = []
    for name in names:
        s = scores[name].detach().float().reshape(-1)
        if allowed is not None:
            s = s.masked_fill(~allowed[name].reshape(-1), -math.inf)
        flat.append(s)
    joined = torch.cat(flat)
    keep = torch.zeros_like(joined, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(joined, int(k), largest=True, sorted=False).indices] = True
    return _split_like(keep, scores)


def drop_lowest_global(
    scores: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], k: int
) -> dict[str, torch.Tensor]:
    """Deactivate the ``k`` active entries with the lowest score over all layers together.

    One ``topk(largest=False)`` over the layers concatenated in the mapping's order, exactly as
    ``torch.nn.utils.prune.global_unstructured(..., pruning_method=L1Unstructured)`` picks them.
    """
    names = list(scores)
    joined = torch.cat([scores[n].detach().float().reshape(-1).masked_fill(~masks[n].reshape(-1), math.inf)
                        for n in names])
    keep = torch.cat([masks[n].reshape(-1) for n in names])
    k = min(int(k), int(keep.sum()))
    if k > 0:
        keep[torch.topk(joined, k, largest=False, sorted=False).indices] = False
    return _split_like(keep, {n: masks[n] for n in names})


def _split_like(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut a tensor of the layers concatenated in ``like``'s order back into per-layer views."""
    out, start = {}, 0
    for name, tensor in like.items():
        out[name] = flat[start : start + tensor.numel()].view_as(tensor)
        start += tensor.numel()
    return out


def changed_only(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``new`` that differ from ``old`` (``update_mask`` returns changed layers only)."""
    return {name: mask for name, mask in new.items() if not torch.equal(mask, old[name])}


def magnitude_masks(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], sparsity: float, scope: str,
    layers: Mapping | None = None,
) -> dict[str, torch.Tensor]:
    """Masks keeping the largest ``|w|`` among the active weights at ``sparsity``.

    ``scope="layer"``: every logical layer keeps ``round((1 - sparsity) · numel)`` weights
    (``layers`` is ``run.layers``; without it fused layouts are recognised by name and shape).
    ``scope="global"``: the layers together keep ``round((1 - sparsity) · N)``. Exactly the masks
    of ``torch.nn.utils.prune.l1_unstructured`` / ``global_unstructured(L1Unstructured)`` with the
    same number of weights to prune (the same ``topk(largest=False)`` picks them). Inactive
    weights are never revived.
    """
    scores = {n: weights[n].detach().abs() for n in masks}
    if scope == "layer":
        def prune(layer, mask):
            keep = round((1.0 - sparsity) * layer.numel)
            return drop_lowest(mask, layer.view(scores[layer.parent]), int(mask.sum()) - keep)

        return map_layers(masks, prune, layers)
    total = sum(m.numel() for m in masks.values())
    active = sum(int(m.sum()) for m in masks.values())
    keep = round((1.0 - sparsity) * total)
    return drop_lowest_global(scores, masks, active - keep)
