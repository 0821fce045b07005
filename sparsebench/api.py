"""The public plugin API: everything a method plugin may import from the harness.

A method plugin — first-party (``plugins/``) or third-party — imports only ``sparsebench``
(:data:`hookimpl`, :class:`Method`) and this module, plus the standard library and its own
dependencies (torch, pydantic, ...). Everything else in the ``sparsebench`` package is harness
internals and may change without notice; the names below keep their meaning across releases.
A test (``tests/harness/test_plugin_api.py``) holds the first-party plugins to this rule.

Writing a method::

    from pydantic import BaseModel, ConfigDict, Field
    from sparsebench.api import Method, changed_only, drop_lowest, grow_random, hookimpl, random_start

    class MyConfig(BaseModel):
        model_config = ConfigDict(extra="forbid")
        delta_t: int = Field(100, ge=1, description="steps between updates")

    class MyMethod(Method):
        name = "my_method"
        Config = MyConfig

        @hookimpl
        def init_mask(self, run, model):
            return random_start(run, "erk")

The hooks, their arguments and when they are called are documented in ``sparsebench/hookspecs.py``;
``run`` (:class:`Run`) is the per-run context every hook receives.

Contents:

* **Writing a method** — :data:`hookimpl`, :data:`hookspec` (for a method's own hookspecs),
  :class:`Method` (the contract, with defaults), :class:`NoOptions`, :class:`Run`,
  :class:`PluginError` (raise it for a bad configuration: the user sees one line).
* **Layers** — :class:`LayerInfo` (``run.layers[name]``: the parameter, fan-in/fan-out, which
  tensor axes they are and its logical layers ``.parts``) and :func:`row_col_dims`.
* **Logical layers** — a fused weight (GPT-2's ``attn.c_attn`` = q | k | v) is several layers
  for everything per-layer. :class:`LogicalLayer` (a view of part of a parameter: ``name``
  like ``…c_attn.weight[q]``, ``parent``, ``shape``, ``fan_in``/``fan_out``, ``numel``,
  ``view(t)``/``put(t, v)``, ``mask(masks)``, ``weight()``, ``grad()``, ``flat_index()``),
  :func:`logical_layers` (``logical_layers(run)`` or ``run.logical_layers``: logical name →
  layer), :func:`map_layers` (apply a per-layer mask function to every logical layer and
  reassemble parameter masks) and :func:`register_fused_layout` (declare another fused layout;
  the known ones are in :data:`FUSED_LAYOUTS`). Masks stay keyed by parameter name.
* **Densities and initial masks** (per logical layer) — :func:`uniform_densities`, :func:`er_densities`,
  :func:`erk_densities`, :func:`layer_densities` (by name, :data:`DISTRIBUTION_NAMES`),
  :func:`random_masks` and :func:`random_start` (the random initial masks of static/SET/RigL).
* **Drop/grow** — :func:`drop_lowest`, :func:`grow_highest`, :func:`grow_random`,
  :func:`keep_top`, :func:`keep_top_global`, :func:`drop_lowest_global`,
  :func:`magnitude_masks`, :func:`changed_only`; schedules :func:`fraction_step`,
  :func:`update_due`, :func:`cosine_drop_fraction` (see :mod:`sparsebench.drop_grow`).
* **Losses** — :func:`cross_entropy` (the harness's training loss), :func:`autocast` (the
  autocast context the loop runs forward passes under; ``autocast_context`` is the old name)
  and :func:`perplexity` (``exp(loss)`` of a mean token NLL, ``inf`` past overflow).
* **Observers** — :func:`mask_scalars` (density per mask and turnover since a starting mask),
  :func:`final_scalars` (``final/…`` and ``final_density/…`` of a summary), :func:`finite` and
  :func:`is_rank0` (whether this process writes; always true without a process group):
  what the logger plugins write besides ``metrics.jsonl``'s records.
* **Kernels** — :func:`gradient_activity` (``[Σg², Σg² over each candidate mask]`` of a layer from
  one pass over its gradient, candidates as swap deltas; SparsAE's proxy) on the backend
  ``run.kernels`` names (Triton on a GPU that supports it, the PyTorch reference otherwise).
"""

from __future__ import annotations

from sparsebench import hookimpl, hookspec
from sparsebench.context import Run, perplexity
from sparsebench.drop_grow import (
    changed_only,
    cosine_drop_fraction,
    drop_lowest,
    drop_lowest_global,
    fraction_step,
    grow_highest,
    grow_random,
    keep_top,
    keep_top_global,
    magnitude_masks,
    update_due,
)
from sparsebench.engines.collectives import is_rank0
from sparsebench.errors import PluginError
from sparsebench.logical_layers import FUSED_LAYOUTS, FusedLayout, LogicalLayer, logical_layers, map_layers, register_fused_layout
from sparsebench.losses import autocast_context, cross_entropy
from sparsebench.masks import (
    DISTRIBUTION_NAMES,
    LayerInfo,
    er_densities,
    erk_densities,
    layer_densities,
    random_masks,
    random_start,
    row_col_dims,
    uniform_densities,
)
from sparsebench.log_scalars import final_scalars, finite, mask_scalars
from sparsebench.methods import Method, NoOptions
from sparsebench_kernels.grad_activity import grad_activity as gradient_activity

#: the autocast context of ``training.dtype`` (a no-op for float32): ``with autocast(run): ...``
autocast = autocast_context

__all__ = [
    # observers (loggers)
    "is_rank0",
    "final_scalars",
    "finite",
    "mask_scalars",
    # kernels
    "gradient_activity",
    # writing a method
    "hookimpl",
    "hookspec",
    "Method",
    "NoOptions",
    "Run",
    "PluginError",
    # layers
    "LayerInfo",
    "row_col_dims",
    # logical layers
    "LogicalLayer",
    "FusedLayout",
    "FUSED_LAYOUTS",
    "logical_layers",
    "map_layers",
    "register_fused_layout",
    # densities and initial masks
    "DISTRIBUTION_NAMES",
    "uniform_densities",
    "er_densities",
    "erk_densities",
    "layer_densities",
    "random_masks",
    "random_start",
    # drop/grow and schedules
    "changed_only",
    "cosine_drop_fraction",
    "drop_lowest",
    "drop_lowest_global",
    "fraction_step",
    "grow_highest",
    "grow_random",
    "keep_top",
    "keep_top_global",
    "magnitude_masks",
    "update_due",
    # losses
    "autocast",
    "autocast_context",
    "cross_entropy",
    "perplexity",
]
