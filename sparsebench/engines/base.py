"""The engine interface: how a training step is executed, on one process or on many.

The loop (:mod:`sparsebench.loop`) calls these methods in this order each optimizer step::

    for each micro-batch:  outputs = engine.model(...); engine.backward(loss, last=...)
    engine.mean_over_ranks(ce, terms)            # the losses every rank logs and checks (read at log steps)
    with engine.dense_grads():  update_mask(...)  # p.grad: the full reduced gradient
    engine.agree(change)                         # rank 0's decision, on every rank
    engine.apply_mask_change(old, new); engine.set_masks(masks); on_mask_change(...)
    engine.adopt_weight_edits(names)             # what the harness and plugins wrote
    engine.mask_grads(); engine.clip_grads(); before_optimizer_step(...)
    engine.step(); engine.mask_weights(); after_optimizer_step(...); engine.adopt_weight_edits()

as Lightning's strategies and Accelerate's accelerator do: the single-process engine
(:class:`~sparsebench.engines.local.LocalEngine`) is the identity wherever a distributed one
communicates, and the loop never asks which one it runs on.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Mapping, Optional, Union

import torch

from sparsebench.engines.mask_ops import MaskUpkeep, zero_pruned_weights
from sparsebench.errors import PluginError

if TYPE_CHECKING:
    from sparsebench.run_setup import Setup


class Engine(ABC):
    """How a step is executed; one instance per run, made before the first hook is called.

    The engine keeps the pruned weights and their gradients at zero (:class:`MaskUpkeep` on the
    module's weights, plus whatever copies of the weights the engine keeps) and owns the
    optimizer step. ``set_masks`` is called whenever ``run.masks`` is replaced.
    """

    #: the name of the engine (in logs and docs)
    name: str = "engine"
    #: whether the engine runs ``training.compile: true`` (a compiled forward through :attr:`model`)
    supports_compile: bool = False

    def __init__(self, setup: "Setup"):
        self.setup, self.run = setup, setup.run
        # a method that keeps dense weights (SR-STE) masks in its forward pass; the harness leaves
        # the pruned weights, their gradients and their optimizer state alone until the last step
        self.keeps_dense = setup.keeps_dense
        self.upkeep = MaskUpkeep(setup.run.sparsifiable, enabled=not setup.keeps_dense)
        self._grad_norm: Optional[torch.Tensor] = None
        #: what the loop calls for a training forward: ``run.model``, or a compiled wrapper sharing its
        #: parameters (``run.model`` itself stays a plain module: plugins copy it, evaluation runs it)
        self.model: Callable[..., Any] = setup.run.model
        if setup.run.config.training.compile and not self.supports_compile:
            raise PluginError(f"training.compile: true is not supported by the {self.name} engine; set it to false")

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Called once before the first step, after the initial masks are applied and a resumed
        run's state is restored (an engine that copies the weights does it here)."""

    def rank_sampler(self, sampler: Any) -> Any:
        """The training sampler of this rank (a slice of the global micro-batch, or ``sampler``)."""
        return sampler

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Track ``masks`` (the new ``run.masks``) for the masking below."""
        self.upkeep.set_masks(masks)

    # -------------------------------------------------------------- backward

    @abstractmethod
    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's loss (scaled for accumulation); ``last``: the step's last."""

    def mean_over_ranks(self, ce: float, terms: dict[str, float]) -> tuple[float, dict[str, float]]:
        """A step's cross-entropy and extra loss terms averaged over ranks (identity on one).

        The loop reads losses where it waits for the device anyway (log steps, mask changes,
        evaluations, checkpoints) and then calls this once per step read, on every rank alike."""
        return ce, terms

    # -------------------------------------------------------------- masks

    def dense_grads(self) -> ContextManager[None]:
        """Inside the block ``p.grad`` holds the full reduced gradient of every sparsifiable weight."""
        return contextlib.nullcontext()

    def agree(self, change: Optional[Mapping[str, torch.Tensor]]) -> Optional[Mapping[str, torch.Tensor]]:
        """The mask change every rank applies: rank 0's (identity on one rank)."""
        return change

    @abstractmethod
    def apply_mask_change(self, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Zero pruned and regrown weights and reset every optimizer moment of changed positions,
        in every copy the engine keeps. Returns the number of changed positions per layer."""

    def adopt_weight_edits(self, names: Optional[Iterable[str]] = None) -> None:
        """Carry writes to ``run.sparsifiable`` weights (by the harness or plugins) into any copy
        of the weights the engine keeps. ``names=None``: after the optimizer step, every weight a
        plugin may have written. Nothing to do where the module's weights are the only copy."""

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights."""
        self.upkeep.mask_grads()

    @torch.no_grad()
    def mask_weights(self) -> None:
        """Zero pruned weights (after the optimizer step and when masks are first applied). Under
        a method that keeps dense weights, once only: after the last step, so the model ends sparse."""
        self.upkeep.mask_weights()
        if self.keeps_dense and self.run.step == self.run.config.training.steps:
            zero_pruned_weights(self.run.sparsifiable, self.run.masks)

    # -------------------------------------------------------------- step

    def clip_grads(self) -> None:
        """Clip the gradients to ``training.grad_clip`` (global norm), before ``before_optimizer_step``."""
        clip = self.run.config.training.grad_clip
        # the norm stays a device tensor: reading it here would wait for the backward pass
        self._grad_norm = torch.nn.utils.clip_grad_norm_(self.run.model.parameters(), clip) if clip else None

    @abstractmethod
    def step(self) -> Union[torch.Tensor, float, None]:
        """The optimizer step; gradients are cleared. Returns the global gradient norm before
        clipping (a float or a 0-dim tensor the loop reads only when it logs it; ``None`` when
        nothing clipped or measured it)."""
