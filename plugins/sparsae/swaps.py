"""Candidate masks as swap lists against the current mask M: sampling, bounds, apply and revert.

A candidate never copies a mask or a weight tensor: per layer it holds the flat indices it
deactivates (``off``, active in M) and activates (``on``, inactive in M) and the values the
activated weights take while it is evaluated — memory O(swaps). Positions are drawn by rejection
sampling against the mask, so even the sampling never materialises an index list of a layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch


@dataclass
class LayerSwaps:
    off: torch.Tensor  # flat indices, active in M, sorted
    on: torch.Tensor  # flat indices, inactive in M, sorted
    init: torch.Tensor  # values of the ``on`` weights while evaluated (and, for the winner, after)


@dataclass
class Candidate:
    """M itself (``kind="current"``, no swaps) or a mutant (``"mutant"``, ``"reset"``)."""

    kind: str
    layers: dict[str, LayerSwaps] = field(default_factory=dict)
    dropped: int = 0  # swaps that could be placed nowhere within the bounds (see sample_layer_counts)
    #: the same swaps per logical layer (flat indices into the layer's view), when ``layers`` is
    #: keyed by parameter (see :func:`to_parameters`); empty when the two coincide
    parts: dict[str, LayerSwaps] = field(default_factory=dict)

    @property
    def n_swaps(self) -> int:
        return sum(int(s.off.numel()) for s in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.layers.values() for t in (s.off, s.on, s.init))

    def active_counts(self, counts: Mapping[str, int]) -> dict[str, int]:
        """``counts`` (per logical layer) after this candidate's swaps."""
        out = dict(counts)
        for name, s in (self.parts or self.layers).items():
            out[name] += int(s.on.numel()) - int(s.off.numel())
        return out

    def new_masks(self, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full masks of the layers this candidate changes."""
        out = {}
        for name, s in self.layers.items():
            if s.off.numel() == 0 and s.on.numel() == 0:
                continue
            mask = masks[name].clone()
            flat = mask.view(-1)
            flat[s.off] = False
            flat[s.on] = True
            out[name] = mask
        return out


def count_bounds(numel: int, min_sparsity: float, max_sparsity: float) -> tuple[int, int]:
    """Active-count bounds ``(lo, hi)`` of a layer with sparsity in [min, max] (float-safe)."""
    lo = math.ceil(round((1.0 - max_sparsity) * numel, 6))
    hi = math.floor(round((1.0 - min_sparsity) * numel, 6))
    return lo, hi


def sample_distinct(total: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct integers from ``[0, total)``, uniformly, in random order (CPU, int64)."""
    if k > total:
        raise ValueError(f"cannot draw {k} distinct values out of {total}")
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    if 4 * k >= total:
        return torch.randperm(total, generator=generator)[:k]
    found = torch.empty(0, dtype=torch.long)
    while found.numel() < k:
        draw = torch.randint(0, total, (2 * (k - found.numel()) + 8,), generator=generator)
        found = torch.unique(torch.cat([found, draw]))
    return found[torch.randperm(found.numel(), generator=generator)[:k]]


def sample_positions(flat_mask: torch.Tensor, value: bool, k: int, n_available: int,
                     generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct flat positions where ``flat_mask == value``, uniformly; sorted, on the mask's device.

    Rejection sampling: draws uniform positions over the layer and keeps the matching ones, so
    its memory is O(k) (at least 5% of a layer matches under the default bounds). Falls back to
    listing the matching positions when they are rare or ``k`` is a large share of them.
    """
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=flat_mask.device)
    numel = flat_mask.numel()
    share = n_available / numel
    if share < 0.01 or 4 * k >= n_available:
        where = torch.nonzero(flat_mask == value).view(-1).cpu()
        chosen = where[torch.randperm(where.numel(), generator=generator)[:k]]
        return chosen.sort().values.to(flat_mask.device)
    found = torch.empty(0, dtype=torch.long, device=flat_mask.device)
    while found.numel() < k:
        need = k - found.numel()
        draw = torch.randint(0, numel, (int(need / share * 1.25) + 16,), generator=generator).to(flat_mask.device)
        draw = draw[flat_mask[draw] == value]
        found = torch.unique(torch.cat([found, draw]))
    keep = torch.randperm(found.numel(), generator=generator)[:k].to(flat_mask.device)
    return found[keep].sort().values


def sample_layer_counts(
    counts: list[int], numel: list[int], lo: list[int], hi: list[int], n_swaps: int, generator: torch.Generator
) -> tuple[list[int], list[int], int, int]:
    """How many connections each layer loses and gains in a mutant of ``n_swaps`` swaps.

    Each swap deactivates a connection drawn uniformly from all active ones and activates one
    drawn uniformly from all inactive ones (the layer of each end follows from global ranks).
    Swaps are then checked in order against the layers' running active counts: a swap that would
    take its source layer below ``lo`` or its destination above ``hi`` is re-sampled *inside* a
    layer — its activation moves into the source layer (or, if that has no inactive position
    left, its deactivation into the destination layer) — so it leaves every count unchanged.
    Layers already outside their bounds (e.g. an ERK start) may only move towards them.

    Returns ``(n_off, n_on, resampled, dropped)``; ``sum(n_off) == sum(n_on) == n_swaps - dropped``
    (``dropped`` is 0 unless a swap fits nowhere, which needs a layer with every position taken).
    """
    total_active = sum(counts)
    inactive = [n - c for n, c in zip(numel, counts)]
    n_swaps = min(n_swaps, total_active, sum(inactive))
    cum_active = torch.tensor(counts).cumsum(0)
    cum_inactive = torch.tensor(inactive).cumsum(0)
    off_layer = torch.searchsorted(cum_active, sample_distinct(total_active, n_swaps, generator), right=True).tolist()
    on_layer = torch.searchsorted(cum_inactive, sample_distinct(sum(inactive), n_swaps, generator), right=True).tolist()

    n_layers = len(counts)
    current = list(counts)
    n_off, n_on = [0] * n_layers, [0] * n_layers
    # positions of each layer not yet claimed by any swap (including swaps still to be checked)
    free_active, free_inactive = list(counts), list(inactive)
    for a in off_layer:
        free_active[a] -= 1
    for b in on_layer:
        free_inactive[b] -= 1
    resampled = dropped = 0
    for a, b in zip(off_layer, on_layer):
        if a != b and (current[a] - 1 < min(lo[a], current[a]) or current[b] + 1 > max(hi[b], current[b])):
            resampled += 1
            if free_inactive[a] > 0:  # activate inside the source layer instead
                free_inactive[a] -= 1
                free_inactive[b] += 1
                b = a
            elif free_active[b] > 0:  # deactivate inside the destination layer instead
                free_active[b] -= 1
                free_active[a] += 1
                a = b
            else:
                dropped += 1
                free_active[a] += 1
                free_inactive[b] += 1
                continue
        n_off[a] += 1
        n_on[b] += 1
        current[a] -= 1
        current[b] += 1
    return n_off, n_on, resampled, dropped


def sample_mutant(
    kind: str,
    masks: Mapping[str, torch.Tensor],
    counts: Mapping[str, int],
    bounds: Mapping[str, tuple[int, int]],
    n_swaps: int,
    generator: torch.Generator,
    init_values: Callable[[str, int], torch.Tensor],
) -> tuple[Candidate, int]:
    """A mutant of exactly ``n_swaps`` swaps within the layer bounds; returns it and the re-sample count.

    ``init_values(name, n)`` gives the values of ``n`` activated weights of layer ``name``
    (e.g. Kaiming draws, or zeros).
    """
    names = list(masks)
    n_off, n_on, resampled, dropped = sample_layer_counts(
        [counts[n] for n in names], [masks[n].numel() for n in names],
        [bounds[n][0] for n in names], [bounds[n][1] for n in names], n_swaps, generator,
    )
    candidate = Candidate(kind, dropped=dropped)
    for i, name in enumerate(names):
        if n_off[i] == 0 and n_on[i] == 0:
            continue
        flat = masks[name].view(-1)
        off = sample_positions(flat, True, n_off[i], counts[name], generator)
        on = sample_positions(flat, False, n_on[i], flat.numel() - counts[name], generator)
        init = init_values(name, n_on[i]).to(device=flat.device, dtype=torch.float32)
        candidate.layers[name] = LayerSwaps(off, on, init)
    return candidate, resampled


def logical_masks(parts: Mapping[str, object], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each logical layer's mask (``parts``: ``run.logical_layers``), flattened; a view for a whole
    parameter, a contiguous copy of a fused weight's part."""
    return {name: layer.view(masks[layer.parent]).reshape(-1) for name, layer in parts.items()}


def to_parameters(candidate: Candidate, parts: Mapping[str, object]) -> Candidate:
    """The candidate with its swaps keyed by parameter (flat indices into the parameter) for
    apply/revert/new masks; the per-logical-layer swaps stay in ``parts``. Identity when every
    logical layer is a whole parameter."""
    if all(parts[name].is_whole for name in candidate.layers):
        return candidate
    merged: dict[str, list[LayerSwaps]] = {}
    for name, s in candidate.layers.items():
        layer = parts[name]
        if layer.is_whole:
            merged.setdefault(layer.parent, []).append(s)
            continue
        index = layer.flat_index().to(s.off.device)
        merged.setdefault(layer.parent, []).append(LayerSwaps(index[s.off], index[s.on], s.init))
    layers = {}
    for parent, items in merged.items():
        off, on = torch.cat([i.off for i in items]), torch.cat([i.on for i in items])
        init = torch.cat([i.init for i in items])
        order = on.argsort()
        layers[parent] = LayerSwaps(off.sort().values, on[order], init[order])
    return Candidate(candidate.kind, layers, candidate.dropped, parts=dict(candidate.layers))


@torch.no_grad()
def apply_swaps(params: Mapping[str, torch.Tensor], candidate: Candidate) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Put a candidate's weights in place; returns what :func:`revert_swaps` needs (O(swaps)).

    Deactivated weights become 0 and activated ones take the candidate's ``init`` values.
    Both ends are saved bit for bit (a pruned weight may hold -0.0).
    """
    saved = {}
    for name, s in candidate.layers.items():
        flat = params[name].detach().view(-1)
        saved[name] = (flat[s.off].clone(), flat[s.on].clone())
        flat[s.off] = 0
        flat[s.on] = s.init.to(flat.dtype)
    return saved


@torch.no_grad()
def revert_swaps(params: Mapping[str, torch.Tensor], candidate: Candidate,
                 saved: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """Undo :func:`apply_swaps` exactly."""
    for name, (off_values, on_values) in (saved or {}).items():
        s = candidate.layers[name]
        flat = params[name].detach().view(-1)
        flat[s.off] = off_values
        flat[s.on] = on_values
