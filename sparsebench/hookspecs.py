"""Hook specifications: the contract between the harness and method plugins.

Every method is a class whose ``@hookimpl`` methods implement some of these hooks. The harness
makes one instance per run and registers it on a fresh :class:`pluggy.PluginManager`, so hooks
may keep state on ``self`` freely. ``step`` is always the 1-based index of the optimizer step in
progress (``1 .. run.total_steps``); schedules count optimizer steps, never micro-batches.

Hooks marked *firstresult* stop at the first plugin that returns something other than ``None``;
the harness's own fallbacks are registered ``trylast=True`` so who wins never depends on load
order. All other hooks call every plugin.

Cost: everything a method does inside its hooks is timed and reported as the run's
``method_time_s`` / ``overhead_frac`` (observers — plugins with ``observer = True`` — are not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

from sparsebench import hookspec

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from sparsebench.context import Run


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------


@hookspec
def configure(run: "Run") -> None:
    """Prepare a plugin for a run.

    :param run: the run context; ``run.model``, ``run.optimizer``, ``run.sparsifiable`` and the
        data exist, ``run.masks`` is still empty.

    Called once per run, before :func:`init_mask` (again on a resumed run, before the
    checkpoint's state replaces the plugin's). Use it to allocate state (an EMA copy, mask
    scores), add parameter groups to ``run.optimizer`` (the learning-rate schedule covers every
    group, including ones added here) or register forward hooks on ``run.model``.
    Returns nothing.
    """


@hookspec(firstresult=True)
def init_mask(run: "Run", model: "torch.nn.Module") -> Optional[Mapping[str, "torch.Tensor"]]:
    """Return the initial masks.

    :param run: the run context.
    :param model: the freshly initialised model (also ``run.model``).
    :return: a mapping parameter name → bool tensor of the parameter's shape for some or all
        names of ``run.sparsifiable`` (missing names stay dense), or ``None`` to pass to the next
        plugin. If every plugin passes, the model starts dense.

    Called once, before the first step (again on a resumed run, whose checkpointed masks then
    replace the result). *firstresult*. The harness validates the masks (names,
    shapes, dtype) and zeroes the pruned weights.
    """


@hookspec
def on_train_start(run: "Run") -> None:
    """Called once after the initial masks are applied, right before step 1.

    ``run.masks`` holds the initial masks. A resumed run calls it again after its state has been
    restored. Returns nothing.
    """


# --------------------------------------------------------------------------------------------
# every step, in this order
# --------------------------------------------------------------------------------------------


@hookspec
def loss_terms(
    run: "Run", step: int, batch: Mapping[str, "torch.Tensor"], outputs: Any
) -> Optional[Mapping[str, "torch.Tensor"]]:
    """Return extra loss terms for this micro-batch.

    :param step: the optimizer step in progress.
    :param batch: ``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` (labels are the
        inputs shifted by one token).
    :param outputs: the model's output for the batch (``outputs.logits``: ``[B, T, V]``).
    :return: ``{name: scalar tensor}``; the harness adds every term to the cross-entropy before
        ``backward()`` and logs each as ``loss/<name>``. ``None`` or ``{}`` adds nothing.

    Called for every micro-batch, before ``backward()``; all plugins are called and their terms
    merged (a name returned twice is an error).
    """


@hookspec(firstresult=True)
def update_mask(
    run: "Run", step: int, masks: Mapping[str, "torch.Tensor"]
) -> Optional[Mapping[str, "torch.Tensor"]]:
    """Decide a mask change.

    :param step: the optimizer step in progress.
    :param masks: the current masks (``run.masks``; do not modify them in place).
    :return: new bool masks for the layers that change, or ``None`` for no change.

    Called every optimizer step after ``backward()`` — the **dense** gradient of every
    sparsifiable weight is in ``p.grad`` (accumulated over micro-batches) — and before
    ``optimizer.step()``. *firstresult*. The harness validates the change (shapes, dtype, and an
    unchanged number of active weights per layer unless the method class declares
    ``changes_density = True``), zeroes pruned weights, sets regrown weights to zero, resets
    every optimizer moment of changed positions, masks the gradients and then calls
    :func:`on_mask_change`. Charge any extra compute on ``run.ledger``. A run whose method
    declares ``keeps_dense_weights = True`` skips the zeroing, resetting and masking: the method
    applies its masks in the forward pass, and the harness zeroes the pruned weights once, after
    the last optimizer step.
    """


@hookspec
def on_mask_change(
    run: "Run", step: int, old: Mapping[str, "torch.Tensor"], new: Mapping[str, "torch.Tensor"]
) -> None:
    """React to an applied mask change.

    :param old: the previous masks of the changed layers.
    :param new: their new masks (already in ``run.masks``).

    Called after the harness applied a change (regrown weights are zero and their optimizer
    state reset, unless a plugin declares ``keeps_dense_weights``). A plugin may re-initialise
    regrown weights (``new & ~old``) or start a burn-in.
    Not called for the initial masks. Returns nothing.
    """


@hookspec
def before_optimizer_step(run: "Run", step: int) -> None:
    """Called right before the optimizer step, after gradient masking and clipping.

    Gradients of pruned weights are zero here (unless a plugin declares ``keeps_dense_weights``:
    then they are dense), and clipped to ``training.grad_clip`` (global
    norm) by the engine (``engine.clip_grads()`` runs just before this hook). One exception,
    under DeepSpeed ZeRO-1/2: the gradients are partitioned over the ranks, so ``p.grad`` is
    ``None`` here and DeepSpeed clips the partitions inside its step, after this hook (only
    there is the global norm known together with fp16 loss scaling and its overflow check).
    At ZeRO stage 0 the gradients are whole and clipped before this hook, as in one process.
    Returns nothing.
    """


@hookspec
def after_optimizer_step(run: "Run", step: int) -> None:
    """Called right after ``optimizer.step()`` and the re-application of the masks.

    Weights are final for this step (an EMA update belongs here). Returns nothing.
    """


# --------------------------------------------------------------------------------------------
# evaluation, logging, end of run
# --------------------------------------------------------------------------------------------


@hookspec
def on_evaluate(run: "Run", step: int, metrics: Mapping[str, float]) -> None:
    """Called after each validation pass with ``{"val_loss": ..., "val_ppl": ...}``.

    Runs every ``training.eval_every`` steps and at the end of training. Returns nothing.
    """


@hookspec
def on_log(run: "Run", step: int, record: Mapping[str, Any]) -> None:
    """Observe a metrics record just written to ``metrics.jsonl``.

    :param record: the step's record (``step``, ``loss``, ``lr``, ``tokens_per_s``, ``val_ppl``, …
        and everything plugins logged through ``run.log``).

    Called at the end of every step that logged something: every ``training.log_every`` steps,
    after evaluations, and whenever a plugin called ``run.log``. For observers (progress displays,
    external loggers); costs nothing unless implemented. Returns nothing.
    """


@hookspec
def on_run_end(run: "Run", summary: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """Called once after the test evaluation, before ``summary.json`` is written.

    :param summary: the summary so far (read-only).
    :return: extra keys to add to the summary (e.g. the memory of an EMA copy), or ``None``.
    """
