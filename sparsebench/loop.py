"""The training loop. Every hook call is a visible one-liner, in the order a step runs them.

How a step is executed (backward, reductions, masking, clipping, the optimizer step) is the
engine's business (:mod:`sparsebench.engines`); this loop reads the same on every engine.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from sparsebench.checkpoints import Checkpointer, LoopState
from sparsebench.context import Run, perplexity
from sparsebench.engines import make_engine
from sparsebench.engines.mask_ops import validate_masks
from sparsebench.errors import SparsebenchError
from sparsebench.losses import LossWindow, autocast_context, cross_entropy
from sparsebench.memory import PeakMemory
from sparsebench.run_setup import Setup
from sparsebench.schedule import set_lr


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
    """Mean token NLL over ``batches`` (every batch holds the same number of tokens per row).

    The batch losses stay on the device until the end: one synchronisation, not one per batch.
    """
    was_training = run.model.training
    run.model.eval()
    losses, sizes = [], []
    with autocast_context(run):
        for batch in batches:
            logits = run.model(input_ids=batch["input_ids"]).logits
            losses.append(cross_entropy(logits, batch["labels"]))
            sizes.append(batch["labels"].numel())
    run.model.train(was_training)
    total, count = 0.0, 0
    for loss, n in zip(torch.stack(losses).tolist(), sizes):  # the float64 arithmetic of a read per batch
        total += loss * n
        count += n
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
    engine = make_engine(setup)  # how a step is executed: one process, or one rank of several
    timings, memory = Timings(), PeakMemory(run.device)
    method_name = run.config.method.name
    started = time.perf_counter()
    memory.reset()

    hooks.configure(run=run)
    masks = complete_masks(run, hooks.init_mask(run=run, model=run.model))
    validate_masks(masks, run.sparsifiable, None, method_name, keep_counts=False)
    run.masks = masks
    engine.set_masks(masks)
    engine.mask_weights()
    initial_masks = {n: m.clone() for n, m in masks.items()}
    prior_peak = 0
    resumed = checkpoints.start()  # a resumed run: every state as it was at the checkpoint's step
    if resumed is not None:
        initial_masks, prior_peak, timings = resumed.initial_masks, resumed.peak_memory_bytes, Timings(**resumed.timings)
        started = time.perf_counter() - timings.total_s  # wall times add up over the segments
        engine.set_masks(run.masks)
    densities = {n: run.density(n) for n in run.masks}
    engine.start()  # an engine that keeps its own copy of the weights takes the masked ones here
    checkpoints.attach(engine)
    sampler = engine.rank_sampler(setup.sampler)
    hooks.on_train_start(run=run)

    run.model.train()
    tokens_per_step = run.tokens_per_step
    window_start, window_tokens = time.perf_counter(), 0
    losses = LossWindow(t.grad_accum)  # read where the host waits anyway: no synchronisation per step
    for step in range(run.step + 1, t.steps + 1):
        run.step = step
        with _non_finite_first(engine, losses):  # a step after a non-finite loss may fail because of it
            step_start = time.perf_counter()
            lr = set_lr(run.optimizer, step, t)

            for micro in range(t.grad_accum):
                batch = sampler.next()
                with autocast_context(run):
                    outputs = engine.model(input_ids=batch["input_ids"])  # run.model, or its compiled form
                    ce = cross_entropy(outputs.logits, batch["labels"])
                terms = hooks.loss_terms(run=run, step=step, batch=batch, outputs=outputs)
                loss = ce + sum(terms.values()) if terms else ce
                engine.backward(loss, last=micro == t.grad_accum - 1)
                losses.add(step, ce, terms)

            with engine.dense_grads():  # p.grad: the full gradient of every sparsifiable weight
                change = hooks.update_mask(run=run, step=step, masks=run.masks)
            change = engine.agree(change)  # rank 0's decision on every rank
            if change:
                _check_losses(engine, losses)  # applying a change waits for the device anyway
                old = {n: run.masks[n] for n in change}
                validate_masks(change, run.sparsifiable, old, method_name, setup.keep_counts)
                changed = engine.apply_mask_change(old, change)  # zeroes weights, resets optimizer moments
                run.masks = {**run.masks, **change}
                engine.set_masks(run.masks)
                densities = {n: run.density(n) for n in run.masks}
                run.log(mask_changed=sum(changed.values()))
                hooks.on_mask_change(run=run, step=step, old=old, new=dict(change))
                engine.adopt_weight_edits(change)  # the weights as the harness and the plugins left them

            upkeep_start = time.perf_counter()
            engine.mask_grads()
            timings.upkeep_s += time.perf_counter() - upkeep_start
            engine.clip_grads()
            hooks.before_optimizer_step(run=run, step=step)
            grad_norm = engine.step()  # a device tensor (or None): read only when logged
            upkeep_start = time.perf_counter()
            engine.mask_weights()
            timings.upkeep_s += time.perf_counter() - upkeep_start
            hooks.after_optimizer_step(run=run, step=step)
            engine.adopt_weight_edits()  # e.g. a burn-in's rescaling after the step

            logged = step % t.log_every == 0 or step == t.steps
            evaluated = bool(t.eval_every) and step % t.eval_every == 0 and step != t.steps
            if logged or evaluated:  # the one device sync of the log window, counted as step time
                ce_total, terms_total = _check_losses(engine, losses)
            run.ledger.add_step(tokens_per_step, densities)
            timings.step_s += time.perf_counter() - step_start
            window_tokens += tokens_per_step

            if logged:
                now = time.perf_counter()
                run.log(
                    loss=ce_total,
                    **{f"loss/{k}": v for k, v in terms_total.items()},
                    lr=lr,
                    tokens=step * tokens_per_step,
                    tokens_per_s=window_tokens / max(now - window_start, 1e-9),
                    sparsity=1.0 - _overall_density(run),
                    train_flops=run.ledger.total,
                    **({"grad_norm": None if grad_norm is None else float(grad_norm)} if t.grad_clip else {}),
                )
                window_start, window_tokens = now, 0
                memory.sample()
            if evaluated:
                eval_start = time.perf_counter()
                _validate(run, setup, step)
                timings.eval_s += time.perf_counter() - eval_start
            _flush(run, setup, step, on_step)
            if checkpoints.due(step):  # every checkpoint_every steps, at the last step, after Ctrl-C
                _check_losses(engine, losses)  # never a checkpoint of weights trained on a non-finite loss
                checkpoints.save(_loop_state(initial_masks, timings, started, memory, prior_peak))
            checkpoints.stop_if_interrupted()

    _check_losses(engine, losses)
    eval_start = time.perf_counter()
    val_loss = _validate(run, setup, run.step)
    _flush(run, setup, run.step, on_step)
    test_loss = evaluate(run, setup.test_batches)
    timings.eval_s += time.perf_counter() - eval_start
    timings.total_s = time.perf_counter() - started
    memory.sample()
    return LoopResult(run, initial_masks, val_loss, test_loss, timings, max(prior_peak, memory.peak_bytes()))


def _check_losses(engine, losses: LossWindow) -> tuple[float, dict[str, float]]:
    """Read the kept losses; raise :class:`NonFiniteLoss` naming the first step whose loss (averaged
    over ranks) is NaN or infinite. Returns the last step's cross-entropy and terms."""
    for step, ce, terms in losses.read():
        ce_total, terms_total = engine.mean_over_ranks(ce, terms)
        if not math.isfinite(ce_total) or not all(map(math.isfinite, terms_total.values())):
            raise NonFiniteLoss(f"loss became non-finite at step {step} (cross-entropy {ce_total}, terms {terms_total})")
        losses.latest = (ce_total, terms_total)
    return losses.latest


@contextlib.contextmanager
def _non_finite_first(engine, losses: LossWindow) -> Iterator[None]:
    """An error in a step after a non-finite loss (e.g. a method choking on NaN gradients) is
    reported as the :class:`NonFiniteLoss` that caused it, naming its step."""
    try:
        yield
    except NonFiniteLoss:
        raise
    except Exception as exc:
        try:
            _check_losses(engine, losses)
        except NonFiniteLoss as non_finite:
            raise non_finite from exc
        except Exception:  # the device itself may be what failed: report the original error
            pass
        raise


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
