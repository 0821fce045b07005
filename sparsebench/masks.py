"""Which weights are sparse, how sparsity is spread over them, random masks and mask statistics.

Conventions:

* A mask is a bool tensor of the weight's shape; ``True`` = active (kept) weight.
* A *density* is the fraction of active weights (1 - sparsity).
* Weights are stored either as ``(out, in)`` (``nn.Linear``, Llama) or ``(in, out)`` (GPT-2's
  ``Conv1D``). :class:`LayerInfo` records which axis is which, so fan-in/fan-out and dead
  rows/columns mean the same thing for both: a *dead row* is an output unit all of whose
  incoming weights are pruned, a *dead column* an input unit with no active outgoing weight.
* Everything per-layer (densities, random masks, statistics) is per **logical layer**
  (:mod:`sparsebench.logical_layers`): a fused weight such as GPT-2's ``attn.c_attn`` counts as
  its q, k and v parts. Densities are keyed by logical name (a parameter's own name when it is
  not fused); masks stay keyed by parameter name.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers.pytorch_utils import Conv1D

from .errors import MaskError
from .logical_layers import LogicalLayer, logical_layers, parts_of, split_layer


@dataclass
class LayerInfo:
    """A sparsifiable weight: its parameter, fan-in/fan-out and which tensor axes they are.

    ``out_dim`` / ``in_dim`` index the weight tensor (``Conv1D``: 1 / 0; ``nn.Linear``: 0 / 1).
    For weights with more than two axes (conv kernels) ``fan_in`` is the product of every axis
    but ``out_dim``, and ``in_dim`` is the input-channel axis.
    """

    name: str
    param: torch.nn.Parameter
    fan_in: int
    fan_out: int
    out_dim: int = 0
    in_dim: int = 1
    #: the weight's logical layers (:func:`~sparsebench.logical_layers.split_layer`); empty = whole
    logical: tuple[LogicalLayer, ...] = ()

    @property
    def parts(self) -> tuple[LogicalLayer, ...]:
        """The logical layers of this weight (one, named like the weight, unless it is fused)."""
        return parts_of(self)

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


def row_col_dims(info: LayerInfo) -> tuple[int, int]:
    """``(out_dim, in_dim)``: the tensor axes of output units (rows) and input units (columns)."""
    return info.out_dim, info.in_dim


def _layer_info(name: str, param: torch.nn.Parameter, module: Optional[torch.nn.Module]) -> LayerInfo:
    shape = tuple(param.shape)
    if isinstance(module, Conv1D):  # GPT-2 stores x @ W with W of shape (in, out)
        return LayerInfo(name, param, fan_in=shape[0], fan_out=shape[1], out_dim=1, in_dim=0)
    if isinstance(module, torch.nn.Embedding):  # a row per token: tokens are the inputs
        return LayerInfo(name, param, fan_in=shape[0], fan_out=shape[1], out_dim=1, in_dim=0)
    # nn.Linear, convolutions and anything else: PyTorch's (out, in, *kernel) convention.
    return LayerInfo(name, param, fan_in=math.prod(shape[1:]), fan_out=shape[0], out_dim=0, in_dim=1)


def _block_prefixes(model: torch.nn.Module) -> list[str]:
    """Names of the transformer blocks: the entries of the longest ModuleList of like modules.

    Found structurally (GPT-2's ``transformer.h``, Llama's ``model.layers``, OPT's
    ``model.decoder.layers``...) so that pretrained models of other families work unchanged.
    """
    best_name, best_len = None, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > best_len:
            if len({type(m) for m in module}) == 1:
                best_name, best_len = name, len(module)
    if best_name is None:
        return []
    return [f"{best_name}.{i}." if best_name else f"{i}." for i in range(best_len)]


def sparsifiable_layers(
    model: torch.nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> dict[str, LayerInfo]:
    """The weights a method may sparsify, in parameter order: name -> :class:`LayerInfo`.

    Default (``include`` empty): every 2-D weight inside the transformer blocks (attention and
    MLP projections); embeddings, position embeddings, the LM head, norms and biases stay dense.
    ``include`` (fnmatch globs over parameter names, e.g. ``"*.mlp.*"``) replaces the default
    set but only matches weights with at least two axes; ``exclude`` removes from the set.
    A tied LM head appears once, under the embedding's name.

    Raises:
        MaskError: a pattern matches nothing (typo guard) or the resulting set is empty.
    """
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owners.setdefault(f"{mod_name}.{p_name}" if mod_name else p_name, module)
    params = {n: p for n, p in model.named_parameters() if p.dim() >= 2}

    if include:
        selected = []
        for pattern in include:
            hits = [n for n in params if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise MaskError(_no_match("include", pattern, list(params)))
            selected += [n for n in hits if n not in selected]
        names = [n for n in params if n in selected]  # keep parameter order
    else:
        prefixes = tuple(_block_prefixes(model))
        names = [n for n, p in params.items() if p.dim() == 2 and prefixes and n.startswith(prefixes)
                 and not isinstance(owners.get(n), torch.nn.Embedding)]

    for pattern in exclude:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise MaskError(_no_match("exclude", pattern, names))
        names = [n for n in names if n not in hits]

    if not names:
        raise MaskError("no sparsifiable weights are left (check sparsify.include / sparsify.exclude)")
    infos = {n: _layer_info(n, params[n], owners.get(n)) for n in names}
    for info in infos.values():
        info.logical = split_layer(info, model)
    return infos


def _no_match(kind: str, pattern: str, candidates: list[str]) -> str:
    shown = ", ".join(candidates[:8]) + (", ..." if len(candidates) > 8 else "")
    return f"sparsify.{kind} pattern '{pattern}' matches no weight with 2+ axes; candidates: {shown}"


# --------------------------------------------------------------------------- density distributions


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise MaskError(f"sparsity must be in [0, 1), got {sparsity}")


def _logical(layers: Mapping[str, Any]) -> dict[str, LogicalLayer]:
    """``layers`` as logical layers: ``run.layers`` (LayerInfo values) is expanded, a mapping of
    :class:`LogicalLayer` is taken as is."""
    if all(isinstance(v, LogicalLayer) for v in layers.values()):
        return dict(layers)
    return logical_layers(layers)


def uniform_densities(layers: Mapping[str, Any], sparsity: float) -> dict[str, float]:
    """Every logical layer at density ``1 - sparsity``."""
    _check_sparsity(sparsity)
    return {name: 1.0 - sparsity for name in _logical(layers)}


def _erdos_renyi(layers: Mapping[str, LogicalLayer], sparsity: float, raw: Mapping[str, float]) -> dict[str, float]:
    """Scale raw scores by one ε so the active count matches; cap layers at density 1.

    Follows google-research/rigl ``sparse_utils.get_sparsities_erdos_renyi``: the target is
    Σ (n_l - floor(sparsity·n_l)); while ε·raw_max > 1 the layer(s) with the largest raw score
    are made dense (their weights leave the budget) and ε is solved again. Making a layer dense
    only frees budget, so ε grows and earlier decisions stay valid.
    """
    _check_sparsity(sparsity)
    dense: set[str] = set()
    while True:
        rhs, divisor = 0.0, 0.0
        for name, info in layers.items():
            n = info.numel
            n_zeros = math.floor(sparsity * n)
            if name in dense:
                rhs -= n_zeros  # this layer keeps its zeros' worth of weights the others lose
            else:
                rhs += n - n_zeros
                divisor += raw[name] * n
        pool = [name for name in layers if name not in dense]
        if not pool:  # only at sparsity ~0: everything dense
            return {name: 1.0 for name in layers}
        eps = rhs / divisor
        max_raw = max(raw[name] for name in pool)
        if eps * max_raw <= 1.0:
            break
        dense.update(name for name in pool if raw[name] == max_raw)
    # min(): the last uncapped layer at sparsity 0 can come out a rounding error above 1.
    return {name: 1.0 if name in dense else min(1.0, eps * raw[name]) for name in layers}


def erk_densities(layers: Mapping[str, Any], sparsity: float, power_scale: float = 1.0) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities as in RigL: density_l ∝ (Σ shape / Π shape) ** power_scale.

    Per logical layer: GPT-2's ``c_attn`` (96×288) is priced as three 96×96 layers. For a 2-D
    weight the score is (n_in + n_out) / (n_in · n_out); for a conv kernel it includes the
    kernel dims. ``power_scale < 1`` flattens the distribution towards uniform (0 = uniform).
    """
    logical = _logical(layers)
    raw = {name: (sum(lay.shape) / math.prod(lay.shape)) ** power_scale for name, lay in logical.items()}
    return _erdos_renyi(logical, sparsity, raw)


def er_densities(layers: Mapping[str, Any], sparsity: float) -> dict[str, float]:
    """Erdős–Rényi densities (SET): density_l ∝ (fan_in + fan_out) / (fan_in · fan_out), capped at 1,
    per logical layer."""
    logical = _logical(layers)
    raw = {name: (lay.fan_in + lay.fan_out) / (lay.fan_in * lay.fan_out) for name, lay in logical.items()}
    return _erdos_renyi(logical, sparsity, raw)


#: the names :func:`layer_densities` accepts (a method's ``distribution`` option)
DISTRIBUTION_NAMES = ("uniform", "erk", "er")


def layer_densities(
    distribution: str, layers: Mapping[str, Any], sparsity: float, power_scale: float = 1.0
) -> dict[str, float]:
    """Per-logical-layer densities of a distribution named in :data:`DISTRIBUTION_NAMES`.

    ``power_scale`` is RigL's ``erk_power_scale`` and only applies to ``erk``.

    Raises:
        ValueError: an unknown distribution name (the message lists the allowed ones).
    """
    if distribution == "uniform":
        return uniform_densities(layers, sparsity)
    if distribution == "erk":
        return erk_densities(layers, sparsity, power_scale=power_scale)
    if distribution == "er":
        return er_densities(layers, sparsity)
    raise ValueError(f"unknown distribution '{distribution}'. Allowed: {', '.join(DISTRIBUTION_NAMES)}")


# --------------------------------------------------------------------------- masks


def random_masks(
    layers: Mapping[str, LayerInfo], densities: Mapping[str, float], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A bool mask per weight with exactly ``round(density · numel)`` active entries per logical layer.

    ``densities`` is keyed by logical name (a fused part may also fall back to its parameter's
    name). Positions are a uniform random subset drawn with ``torch.randperm`` from
    ``generator`` (drawn on the generator's device, so a CPU generator gives the same masks on
    any device); the mask lives on the parameter's device. Dense layers consume no random numbers.
    """
    masks = {}
    for name, info in layers.items():
        parts = parts_of(info)
        if len(parts) == 1 and parts[0].is_whole:
            masks[name] = _random_part(parts[0], _density(densities, parts[0]), generator).to(info.param.device)
            continue
        mask = torch.zeros(info.shape, dtype=torch.bool)
        for part in parts:
            part.put(mask, _random_part(part, _density(densities, part), generator))
        masks[name] = mask.to(info.param.device)
    return masks


def _density(densities: Mapping[str, float], layer: LogicalLayer) -> float:
    density = densities[layer.name] if layer.name in densities else densities[layer.parent]
    density = float(density)
    if not 0.0 <= density <= 1.0:
        raise MaskError(f"density of {layer.name} must be in [0, 1], got {density}")
    return density


def _random_part(layer: LogicalLayer, density: float, generator: torch.Generator) -> torch.Tensor:
    n = layer.numel
    k = round(density * n)
    if k == n:
        return torch.ones(layer.shape, dtype=torch.bool)
    flat = torch.zeros(n, dtype=torch.bool, device=generator.device)
    flat[torch.randperm(n, generator=generator, device=generator.device)[:k]] = True
    return flat.cpu().view(layer.shape)


def random_start(run: Any, distribution: str, power_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Random masks at ``run.sparsity`` with the layer densities of ``distribution``.

    Drawn from ``run.generator`` over ``run.layers``: the initial masks of every method that
    starts from a random sparse mask (static, SET, RigL, SparsAE), so that methods given the same
    seed and distribution start from the same masks.
    """
    densities = layer_densities(distribution, run.layers, run.sparsity, power_scale)
    return random_masks(run.layers, densities, run.generator)


def _dead_units(mask: torch.Tensor, keep_dim: int) -> torch.Tensor:
    """Number of indices along ``keep_dim`` whose slice of the mask has no active entry."""
    slices = mask.movedim(keep_dim, 0).reshape(mask.shape[keep_dim], -1)
    return (~slices.any(dim=1)).sum()


def mask_stats(
    masks: Mapping[str, torch.Tensor],
    initial: Optional[Mapping[str, torch.Tensor]],
    layers: Mapping[str, LayerInfo],
) -> dict[str, Any]:
    """Figures for logs and ``summary.json``, per logical layer.

    Keys: ``sparsity_actual`` (zeros / all sparsifiable weights), ``n_active``, ``n_total``,
    ``layer_density`` (logical name -> density), ``turnover`` (fraction of the currently active
    positions that were not active in ``initial``; ``None`` without it), ``dead_rows`` /
    ``dead_cols`` (output units with no incoming / input units with no outgoing active weight,
    summed over logical layers: an input unit dead for ``c_attn[q]`` counts there even if it
    feeds ``[k]``) and per logical layer ``dead_rows_by_layer`` / ``dead_cols_by_layer`` /
    ``rows_by_layer`` / ``cols_by_layer`` (the unit counts). All counts are gathered into one
    tensor so a GPU run synchronises once.
    """
    names, sizes, rows = [], {}, []
    for name, m in masks.items():
        new_all = m & ~initial[name] if initial is not None else None
        for part in parts_of(layers[name]):
            pm = part.view(m)
            out_dim, in_dim = part.out_dim, part.in_dim
            new = part.view(new_all).sum() if new_all is not None else pm.new_zeros((), dtype=torch.long)
            rows.append(torch.stack([pm.sum(), new, _dead_units(pm, out_dim), _dead_units(pm, in_dim)]))
            names.append(part.name)
            sizes[part.name] = (part.numel, part.shape[out_dim], part.shape[in_dim])
    counts = torch.stack(rows).cpu().tolist() if rows else []
    by_name = dict(zip(names, counts))
    n_total = sum(m.numel() for m in masks.values())
    n_active = sum(c[0] for c in counts)
    return {
        "sparsity_actual": 1.0 - n_active / n_total if n_total else 0.0,
        "n_active": n_active,
        "n_total": n_total,
        "layer_density": {n: by_name[n][0] / sizes[n][0] for n in names},
        "turnover": (sum(c[1] for c in counts) / n_active if n_active else 0.0) if initial is not None else None,
        "dead_rows": sum(c[2] for c in counts),
        "dead_cols": sum(c[3] for c in counts),
        "dead_rows_by_layer": {n: by_name[n][2] for n in names},
        "dead_cols_by_layer": {n: by_name[n][3] for n in names},
        "rows_by_layer": {n: sizes[n][1] for n in names},
        "cols_by_layer": {n: sizes[n][2] for n in names},
    }


def parameter_densities(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Parameter name -> density of the whole tensor (what FLOPs are priced with: a fused weight
    is one matmul)."""
    names = list(masks)
    counts = torch.stack([masks[n].sum() for n in names]).cpu().tolist() if names else []
    return {n: c / masks[n].numel() for n, c in zip(names, counts)}
