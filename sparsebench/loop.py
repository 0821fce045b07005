"""The training loop. Every hook call is a visible one-liner, in the order a step runs them."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from sparsebench.checkpoint import Checkpointer, LoopState
from sparsebench.context import Run, perplexity
from sparsebench.distributed import make_trainer
from sparsebench.errors import SparsebenchError
from sparsebench.losses import autocast_context, cross_entropy
from sparsebench.engines.mask_ops import MaskUpkeep, apply_mask_change, validate_masks, zero_pruned_weights
from sparsebench.memory import PeakMemory
from sparsebench.schedule import set_lr
from sparsebench.run_setup import Setup


class NonFiniteLoss(SparsebenchError):
    """The training loss became NaN or infinite."""


@dataclass
class Timings:
    step_s: float = 0.0  # wall time of training steps (no evaluation)
    upkeep_s: float = 0.0  # the harness keeping pruned weights and gradients at zero
    eval_s: float = 0.0
    total_s: float = 0.0


@dataclass
class LoopResult:
    run: Run
    initial_masks: dict[str, torch.Tensor]
    val_loss: float
    test_loss: float
    timings: Timings
    peak_memory_bytes: int
    extra_summary: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def evaluate(run: Run, batches: list) -> float:
    """Mean token NLL over ``batches`` (every batch holds the same number of tokens per row)."""
    was_training = run.model.training
    run.model.eval()
    total, count = 0.0, 0
    with autocast_context(run):
        for batch in batches:
            logits = run.model(input_ids=batch["input_ids"]).logits
            n = batch["labels"].numel()
            total += float(cross_entropy(logits, batch["labels"])) * n
            count += n
    run.model.train(was_training)
    return total / count


def complete_masks(run: Run, initial: Optional[dict]) -> dict[str, torch.Tensor]:
    """Every sparsifiable weight gets a mask; the ones a method left out are all-True."""
    initial = dict(initial or {})
    return {
        name: initial[name] if name in initial else torch.ones_like(p, dtype=torch.bool)
        for name, p in run.sparsifiable.items()
    }


def train(
    setup: Setup,
    on_step: Optional[Callable[[int, dict], None]] = None,
    checkpoints: Optional[Checkpointer] = None,
) -> LoopResult:
    """Train ``setup``'s run. ``checkpoints``: where and whether to resume (default: a fresh start,
    checkpoints written to ``run.out_dir`` when it is set)."""
    run, hooks, t = setup.run, setup.hooks, setup.run.config.training
    checkpoints = checkpoints or Checkpointer(setup)
    timings, memory, upkeep = Timings(), PeakMemory(run.device), MaskUpkeep(run.sparsifiable, not setup.keeps_dense)
    method_name = run.config.method.name
    started = time.perf_counter()
    memory.reset()

    hooks.configure(run=run)
    masks = complete_masks(run, hooks.init_mask(run=run, model=run.model))
    validate_masks(masks, run.sparsifiable, None, method_name, keep_counts=False)
    run.masks = masks
    upkeep.set_masks(masks)
    upkeep.mask_weights()
    initial_masks = {n: m.clone() for n, m in masks.items()}
    prior_peak = 0
    resumed = checkpoints.start()  # a resumed run: every state as it was at the checkpoint's step
    if resumed is not None:
        initial_masks, prior_peak, timings = resumed.initial_masks, resumed.peak_memory_bytes, Timings(**resumed.timings)
        started = time.perf_counter() - timings.total_s  # wall times add up over the segments
        upkeep.set_masks(run.masks)
    densities = {n: run.density(n) for n in run.masks}
    ds = make_trainer(setup, checkpoints)  # DeepSpeed engine (None in one process); copies the masked weights
    if ds and setup.keeps_dense:
        raise SparsebenchError(f"method '{method_name}' keeps dense weights (keeps_dense_weights), which DeepSpeed runs do not support yet")
    if ds:
        ds.set_masks(run.masks)
    hooks.on_train_start(run=run)

    run.model.train()
    tokens_per_step = run.tokens_per_step
    window_start, window_tokens = time.perf_counter(), 0
    for step in range(run.step + 1, t.steps + 1):
        run.step = step
        step_start = time.perf_counter()
        lr = set_lr(run.optimizer, step, t)

        ce_total, terms_total = 0.0, {}
        for micro in range(t.grad_accum):
            batch = setup.sampler.next()
            with autocast_context(run):
                outputs = run.model(input_ids=batch["input_ids"])
                ce = cross_entropy(outputs.logits, batch["labels"])
            terms = hooks.loss_terms(run=run, step=step, batch=batch, outputs=outputs)
            loss = ce + sum(terms.values()) if terms else ce
            if ds:
                ds.backward(loss, last=micro == t.grad_accum - 1)
            else:
                (loss / t.grad_accum).backward()
            ce_total += float(ce.detach()) / t.grad_accum  # a device sync: needed for the NaN check anyway
            for k, v in terms.items():
                terms_total[k] = terms_total.get(k, 0.0) + float(v.detach()) / t.grad_accum
        if ds:
            ce_total, terms_total = ds.global_mean(ce_total, terms_total)
        if not math.isfinite(ce_total) or not all(map(math.isfinite, terms_total.values())):
            raise NonFiniteLoss(f"loss became non-finite at step {step} (cross-entropy {ce_total}, terms {terms_total})")

        with ds.dense_grads() if ds else contextlib.nullcontext():
            change = hooks.update_mask(run=run, step=step, masks=run.masks)
        if ds:
            change = ds.agree(change)  # rank 0's decision on every rank
        if change:
            old = {n: run.masks[n] for n in change}
            validate_masks(change, run.sparsifiable, old, method_name, setup.keep_counts)
            changed = apply_mask_change(run.optimizer, run.sparsifiable, old, change, setup.keeps_dense)
            if ds:
                ds.reset_state(old, change)
            run.masks = {**run.masks, **change}
            upkeep.set_masks(run.masks)
            densities = {n: run.density(n) for n in run.masks}
            run.log(mask_changed=sum(changed.values()))
            hooks.on_mask_change(run=run, step=step, old=old, new=dict(change))
            if ds:
                ds.set_masks(run.masks)
                ds.adopt_weight_edits(change)  # the weights as the harness and the plugins left them

        upkeep_start = time.perf_counter()
        upkeep.mask_grads()
        if ds:
            ds.mask_grads()
        timings.upkeep_s += time.perf_counter() - upkeep_start
        if t.grad_clip and not ds:  # under DeepSpeed, ds.step() clips
            grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip))
        hooks.before_optimizer_step(run=run, step=step)
        if ds:
            grad_norm = ds.step()
        else:
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        upkeep_start = time.perf_counter()
        upkeep.mask_weights()
        if setup.keeps_dense and step == t.steps:  # the method kept dense weights: the model ends sparse
            zero_pruned_weights(run.sparsifiable, run.masks)
        timings.upkeep_s += time.perf_counter() - upkeep_start
        hooks.after_optimizer_step(run=run, step=step)
        if ds and ds.edits_after_step:
            ds.adopt_weight_edits()

        run.ledger.add_step(tokens_per_step, densities)
        timings.step_s += time.perf_counter() - step_start
        window_tokens += tokens_per_step

        if step % t.log_every == 0 or step == t.steps:
            now = time.perf_counter()
            run.log(
                loss=ce_total,
                **{f"loss/{k}": v for k, v in terms_total.items()},
                lr=lr,
                tokens=step * tokens_per_step,
                tokens_per_s=window_tokens / max(now - window_start, 1e-9),
                sparsity=1.0 - _overall_density(run),
                train_flops=run.ledger.total,
                **({"grad_norm": grad_norm} if t.grad_clip else {}),
            )
            window_start, window_tokens = now, 0
            memory.sample()
        if t.eval_every and step % t.eval_every == 0 and step != t.steps:
            eval_start = time.perf_counter()
            _validate(run, setup, step)
            timings.eval_s += time.perf_counter() - eval_start
        _flush(run, setup, step, on_step)
        if checkpoints.due(step):  # every checkpoint_every steps, at the last step, after Ctrl-C
            checkpoints.save(_loop_state(initial_masks, timings, started, memory, prior_peak))
        checkpoints.stop_if_interrupted()

    eval_start = time.perf_counter()
    val_loss = _validate(run, setup, run.step)
    _flush(run, setup, run.step, on_step)
    test_loss = evaluate(run, setup.test_batches)
    timings.eval_s += time.perf_counter() - eval_start
    timings.total_s = time.perf_counter() - started
    memory.sample()
    return LoopResult(run, initial_masks, val_loss, test_loss, timings, max(prior_peak, memory.peak_bytes()))


def _loop_state(initial_masks: dict, timings: Timings, started: float, memory: PeakMemory, prior_peak: int) -> LoopState:
    totals = {**asdict(timings), "total_s": time.perf_counter() - started}
    return LoopState(initial_masks, totals, max(prior_peak, memory.peak_bytes()))


def _overall_density(run: Run) -> float:
    total = sum(m.numel() for m in run.masks.values())
    return sum(int(m.sum()) for m in run.masks.values()) / max(total, 1)


def _validate(run: Run, setup: Setup, step: int) -> float:
    val_loss = evaluate(run, setup.val_batches)
    metrics = {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}
    run.log(**metrics)
    setup.hooks.on_evaluate(run=run, step=step, metrics=metrics)
    return val_loss


def _flush(run: Run, setup: Setup, step: int, on_step: Optional[Callable[[int, dict], None]]) -> None:
    record = run.metrics.flush(step)
    if record is not None:
        setup.hooks.on_log(run=run, step=step, record=record)
        if on_step is not None:
            on_step(step, record)
