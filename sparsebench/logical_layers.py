"""Logical layers: a fused weight (GPT-2's ``attn.c_attn`` = q | k | v) is several layers.

Everything per-layer in sparsebench — ERK/ER/uniform densities, random initial masks, the
active count a dynamic method keeps, ``scope: layer`` pruning, dead rows/columns and
``layer_density`` — works on **logical layers**. A parameter that no fused layout matches is
one logical layer named like the parameter; a fused one is split along its output axis into
parts named ``<parameter>[<part>]`` (``transformer.h.0.attn.c_attn.weight[q]``). Masks stay
keyed by parameter name with the parameter's shape: a logical layer is a *view* of a slice of
its parent's tensors, never a tensor of its own.

The known fused layouts are declared here, in :data:`FUSED_LAYOUTS`; add one with
:func:`register_fused_layout` (the extension point)::

    from sparsebench.api import register_fused_layout
    register_fused_layout("my-qkv", "*.attn.qkv_proj.weight", parts=("q", "k", "v"), axis=0)

A part is an index set along one tensor axis: a contiguous ``slice`` when the layout has one
group (GPT-2: ``[0:d]``, ``[d:2d]``, ``[2d:3d]``), a ``LongTensor`` of indices when parts are
interleaved per group (GPT-NeoX's ``query_key_value``: heads × (q, k, v) × head_dim).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch

from sparsebench.errors import MaskError

Index = Union[slice, torch.Tensor, None]

__all__ = [
    "LogicalLayer",
    "FusedLayout",
    "FUSED_LAYOUTS",
    "register_fused_layout",
    "split_layer",
    "logical_layers",
    "logical_parts",
    "map_layers",
]


@dataclass(frozen=True, eq=False)
class LogicalLayer:
    """One logical layer: a whole parameter, or one part of a fused one.

    ``axis`` is the tensor axis the part is cut along (``None``: the whole parameter) and
    ``index`` the part's positions on it — a ``slice`` (contiguous: :meth:`view` returns a real
    view) or a ``LongTensor`` (strided: :meth:`view` returns a copy; write with :meth:`put`).
    ``out_dim`` / ``in_dim`` are the parent's axes of output and input units (the part keeps
    the parent's number of axes), ``fan_in`` / ``fan_out`` the part's.
    """

    name: str
    parent: str
    shape: tuple[int, ...]
    parent_shape: tuple[int, ...]
    fan_in: int
    fan_out: int
    out_dim: int = 0
    in_dim: int = 1
    axis: Optional[int] = None
    index: Index = None
    param: Optional[torch.nn.Parameter] = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_whole(self) -> bool:
        return self.axis is None

    @property
    def is_contiguous(self) -> bool:
        """True when :meth:`view` returns a view of the parent's storage (whole or a slice)."""
        return not isinstance(self.index, torch.Tensor)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (shaped like the parent) restricted to this layer: a view where contiguous,
        a copy for a strided part (use :meth:`put` to write it back)."""
        if self.axis is None:
            return tensor
        if isinstance(self.index, slice):
            return tensor.narrow(self.axis, self.index.start, self.index.stop - self.index.start)
        return tensor.index_select(self.axis, self.index.to(tensor.device))

    def put(self, target: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` (this layer's shape) into ``target`` (the parent's shape), in place."""
        if self.axis is None:
            target.copy_(values)
        elif isinstance(self.index, slice):
            self.view(target).copy_(values)
        else:
            target.index_copy_(self.axis, self.index.to(target.device), values.to(target.dtype))

    def mask(self, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The parent's mask in ``masks`` restricted to this layer."""
        return self.view(masks[self.parent])

    def weight(self) -> torch.Tensor:
        """The parent's weight restricted to this layer (detached)."""
        return self.view(self._param().detach())

    def grad(self) -> Optional[torch.Tensor]:
        """The parent's ``.grad`` restricted to this layer, or ``None`` if it has none."""
        grad = self._param().grad
        return None if grad is None else self.view(grad)

    def flat_index(self) -> torch.Tensor:
        """Positions in the parent's flattened tensor of this layer's entries, in the row-major
        order of :meth:`view` (CPU ``LongTensor``)."""
        return self.view(torch.arange(_prod(self.parent_shape)).view(self.parent_shape)).reshape(-1)

    def _param(self) -> torch.nn.Parameter:
        if self.param is None:
            raise MaskError(f"logical layer '{self.name}' was built without its parameter")
        return self.param


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------- fused layouts


@dataclass(frozen=True)
class FusedLayout:
    """A fused weight: parameters named like ``pattern`` are split along tensor ``axis``.

    The axis holds ``groups × len(parts) × size`` entries: per group, one contiguous run of
    ``size`` per part. ``groups`` is an int or a function of the model (e.g. its number of
    attention heads); 1 makes each part one contiguous slice.
    """

    name: str
    pattern: str
    parts: tuple[str, ...]
    axis: int
    groups: Union[int, Callable[[Any], int]] = 1

    def n_groups(self, model: Any) -> Optional[int]:
        if isinstance(self.groups, int):
            return self.groups
        return None if model is None else int(self.groups(model))


def _neox_heads(model: Any) -> int:
    return model.config.num_attention_heads


#: The known fused layouts, first match wins (the extension point: :func:`register_fused_layout`).
FUSED_LAYOUTS: list[FusedLayout] = [
    # GPT-2 Conv1D (in, out): c_attn's output axis 1 is q | k | v, each n_embd wide.
    FusedLayout("gpt2-c_attn", "*.attn.c_attn.weight", ("q", "k", "v"), axis=1),
    # GPT-NeoX / Pythia nn.Linear (out, in): the output axis 0 is heads × (q, k, v) × head_dim.
    FusedLayout("gpt-neox-query_key_value", "*.attention.query_key_value.weight", ("q", "k", "v"), axis=0,
                groups=_neox_heads),
]


def register_fused_layout(name: str, pattern: str, parts: tuple[str, ...], axis: int,
                          groups: Union[int, Callable[[Any], int]] = 1) -> FusedLayout:
    """Declare a fused weight layout (see :class:`FusedLayout`); it takes precedence over the
    built-in ones. Call it before the run is set up (e.g. at import of your plugin package)."""
    layout = FusedLayout(name, pattern, tuple(parts), axis, groups)
    FUSED_LAYOUTS.insert(0, layout)
    return layout


def _layout_for(name: str) -> Optional[FusedLayout]:
    return next((lay for lay in FUSED_LAYOUTS if fnmatch.fnmatchcase(name, lay.pattern)), None)


def _whole(name: str, shape: tuple[int, ...], fan_in: int, fan_out: int, out_dim: int, in_dim: int,
           param: Optional[torch.nn.Parameter]) -> LogicalLayer:
    return LogicalLayer(name, name, shape, shape, fan_in, fan_out, out_dim, in_dim, None, None, param)


def split_layer(info: Any, model: Any = None) -> tuple[LogicalLayer, ...]:
    """The logical layers of one sparsifiable weight (``info``: a :class:`~sparsebench.masks.LayerInfo`).

    Without ``model`` only layouts whose ``groups`` is a number can be resolved; a layout that
    needs the model (GPT-NeoX's heads) then leaves the weight whole.

    Raises:
        MaskError: the weight's axis does not divide into the layout's parts and groups.
    """
    shape = tuple(info.shape)
    whole = (_whole(info.name, shape, info.fan_in, info.fan_out, info.out_dim, info.in_dim, info.param),)
    layout = _layout_for(info.name)
    if layout is None or len(shape) < 2 or layout.axis >= len(shape):
        return whole
    groups = layout.n_groups(model)
    if groups is None:
        return whole
    length, n_parts = shape[layout.axis], len(layout.parts)
    if length % (groups * n_parts):
        raise MaskError(f"fused layout '{layout.name}': axis {layout.axis} of {info.name} {shape} does not "
                        f"divide into {groups} group(s) × {n_parts} parts")
    size = length // (groups * n_parts)
    out = []
    for j, part in enumerate(layout.parts):
        if groups == 1:
            index: Index = slice(j * size, (j + 1) * size)
        else:
            starts = torch.arange(groups) * n_parts * size + j * size
            index = (starts[:, None] + torch.arange(size)[None, :]).reshape(-1)
        part_shape = tuple(groups * size if d == layout.axis else s for d, s in enumerate(shape))
        fan_out = part_shape[info.out_dim]
        fan_in = _prod(part_shape) // fan_out
        out.append(LogicalLayer(f"{info.name}[{part}]", info.name, part_shape, shape, fan_in, fan_out,
                                info.out_dim, info.in_dim, layout.axis, index, info.param))
    return tuple(out)


# --------------------------------------------------------------------------- collections


def logical_parts(layers: Optional[Mapping[str, Any]], name: str, like: Optional[torch.Tensor] = None
                  ) -> tuple[LogicalLayer, ...]:
    """The logical layers of parameter ``name``: from ``layers`` (``run.layers``) when given,
    else resolved from the name and ``like``'s shape alone (layouts that need the model stay whole)."""
    if layers is not None:
        return parts_of(layers[name])
    if like is None:
        raise MaskError(f"logical_parts('{name}') needs run.layers or a tensor of the parameter's shape")
    shape = tuple(like.shape)
    return split_layer(_ShapeOnly(name, shape), None)


@dataclass
class _ShapeOnly:
    """What :func:`split_layer` needs of a weight known only by name and shape (layout axis = out)."""

    name: str
    shape: tuple[int, ...]
    param: Any = None

    @property
    def out_dim(self) -> int:
        layout = _layout_for(self.name)
        return layout.axis if layout is not None else 0

    @property
    def in_dim(self) -> int:
        return 1 - self.out_dim if len(self.shape) == 2 else 1

    @property
    def fan_out(self) -> int:
        return self.shape[self.out_dim]

    @property
    def fan_in(self) -> int:
        return _prod(self.shape) // self.fan_out


def parts_of(info: Any) -> tuple[LogicalLayer, ...]:
    """``info.logical`` (set by :func:`~sparsebench.masks.sparsifiable_layers`), or the weight whole."""
    parts = getattr(info, "logical", None)
    if parts:
        return tuple(parts)
    return (_whole(info.name, tuple(info.shape), info.fan_in, info.fan_out, info.out_dim, info.in_dim,
                   getattr(info, "param", None)),)


def logical_layers(layers: Any) -> dict[str, LogicalLayer]:
    """Logical name → :class:`LogicalLayer` over ``layers`` (``run.layers``, or the run itself),
    in parameter order."""
    if hasattr(layers, "layers") and not isinstance(layers, Mapping):
        layers = layers.layers
    out: dict[str, LogicalLayer] = {}
    for info in layers.values():
        for layer in parts_of(info):
            out[layer.name] = layer
    return out


def map_layers(masks: Mapping[str, torch.Tensor], fn: Callable[[LogicalLayer, torch.Tensor], torch.Tensor],
               layers: Optional[Mapping[str, Any]] = None) -> dict[str, torch.Tensor]:
    """Apply ``fn(layer, mask_of_layer) -> new_mask_of_layer`` to every logical layer of ``masks``
    and reassemble new parameter masks (``masks`` is not modified).

    ``layers`` is ``run.layers``; without it fused layouts are resolved from names and shapes.
    A parameter that is one logical layer gets ``fn``'s result as is.
    ``masks`` may hold any tensors shaped like the parameters (e.g. scores); the result's dtype
    is ``fn``'s. The parts of a fused layout cover the whole parameter, so every entry is set.
    """
    out = {}
    for name, mask in masks.items():
        parts = logical_parts(layers, name, mask)
        if len(parts) == 1 and parts[0].is_whole:
            out[name] = fn(parts[0], mask)
            continue
        new = None
        for layer in parts:
            result = fn(layer, layer.view(mask))
            if new is None:
                new = torch.empty(tuple(mask.shape), dtype=result.dtype, device=result.device)
            layer.put(new, result)
        out[name] = new
    return out
