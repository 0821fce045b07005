"""Launched by tests/engines/test_deepspeed.py as ``deepspeed --num_gpus 2 --module tests.engines.deepspeed_worker
SUITE... --out OUT``: runs each suite on every rank and dumps what each rank holds after training.

The suites name test plugins registered here: ``swap-dst`` (a mask-changing method that uses the
dense gradient, the weights' magnitude and ``run.generator``, and re-initialises regrown weights),
``rank-dump`` (an observer that writes ``<dir>/<method>/rank<r>.pt``) and ``crash-once`` (raises
once after a given step, so that the next attempt resumes from a checkpoint).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from sparsebench import hookimpl
from sparsebench.masks import random_masks, uniform_densities
from sparsebench.methods import Method


class SwapConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every: int = 4
    fraction: float = 0.25


class SwapDST(Method):
    """Every ``every`` steps, per layer: drop the ``fraction`` of active weights with the smallest
    magnitude; regrow as many, half where the dense gradient is largest (RigL-like), half at
    random from ``run.generator`` (SET-like); regrown weights get small random values."""

    name = "swap-dst"
    Config = SwapConfig

    @hookimpl
    def init_mask(self, run, model):
        return random_masks(run.layers, uniform_densities(run.layers, run.sparsity), run.generator)

    @hookimpl
    def update_mask(self, run, step, masks):
        if step % self.config.every or step == run.total_steps:
            return None
        new = {}
        for name, mask in masks.items():
            param = run.sparsifiable[name]
            k = max(2, int(self.config.fraction * int(mask.sum())))
            flat = mask.clone().reshape(-1)
            magnitude = param.detach().abs().reshape(-1).masked_fill(~flat, float("inf"))
            flat[torch.topk(magnitude, k, largest=False).indices] = False
            grad = param.grad.detach().abs().reshape(-1).masked_fill(flat | mask.reshape(-1), -1.0)
            flat[torch.topk(grad, k // 2).indices] = True
            free = torch.nonzero(~flat & ~mask.reshape(-1)).squeeze(1)
            pick = torch.randperm(free.numel(), generator=run.generator)[: k - k // 2]
            flat[free[pick]] = True
            new[name] = flat.view_as(mask)
        return new

    @hookimpl
    def on_mask_change(self, run, step, old, new):
        with torch.no_grad():
            for name, mask in new.items():
                grown = mask & ~old[name]
                values = torch.randn(int(grown.sum()), generator=run.generator) * 0.02
                run.sparsifiable[name][grown] = values.to(run.sparsifiable[name].dtype)


class CrashConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at_step: int = 5
    marker: str = "crashed-once"


class CrashOnce(Method):
    """Raises after optimizer step ``at_step`` the first time (a marker file remembers): a killed run."""

    name = "crash-once"
    Config = CrashConfig
    observer = True

    @hookimpl
    def after_optimizer_step(self, run, step):
        marker = Path(self.config.marker)
        if step == self.config.at_step and not marker.exists():
            from sparsebench.engines import collectives

            collectives.barrier()  # every rank has seen the step before any marks it
            if collectives.is_rank0():
                marker.write_text("1")
            collectives.barrier()
            raise RuntimeError(f"simulated crash after step {step}")


class DumpConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dir: str = "rank-dumps"


class RankDump(Method):
    """Observer: at the end of a run, writes this rank's masks, weights and fp32 master weights."""

    name = "rank-dump"
    Config = DumpConfig
    observer = True

    def __init__(self, config=None):
        super().__init__(config)
        self.mask_changes = 0

    @hookimpl
    def on_mask_change(self, run, step, old, new):
        self.mask_changes += 1

    @hookimpl
    def on_run_end(self, run, summary):
        from sparsebench.engines.collectives import rank
        from sparsebench.engines.deepspeed_config import uses_deepspeed

        master = {}
        if uses_deepspeed(run.config):
            from deepspeed.utils import safe_get_full_fp32_param

            for name, p in run.sparsifiable.items():  # a collective per weight, same order on every rank
                full = safe_get_full_fp32_param(p)
                if full is not None:
                    master[name] = full.detach().view_as(p).cpu()
        out = Path(self.config.dir) / run.config.method.display / f"rank{rank()}.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({
            "masks": {n: m.cpu() for n, m in run.masks.items()},
            "params": {n: p.detach().cpu().clone() for n, p in run.model.named_parameters()},
            "master": master,
            "mask_changes": self.mask_changes,
            "val_loss": summary["val_loss"],
            "summary": {k: summary.get(k) for k in (
                "world_size", "zero_stage", "global_batch_size", "micro_batch_size", "mask_disagreement",
                "tokens", "train_flops", "steps")},
        }, out)
        return None


def main() -> None:
    from rich.console import Console

    from sparsebench.engines.collectives import rank
    from sparsebench.runner import run_suite
    from tests.helpers import registry_with

    parser = argparse.ArgumentParser()
    parser.add_argument("suites", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=None)  # the launcher adds it; LOCAL_RANK is used
    parser.add_argument("--resume-suite", type=Path, help="run twice: the first attempt crashes, the second resumes")
    args = parser.parse_args()
    registry = registry_with(SwapDST, RankDump, CrashOnce)
    failed = 0
    for suite in args.suites:
        outcome = run_suite(suite, args.out, registry=registry, fresh=True, console=Console(quiet=True))
        failed += len(outcome.failed)
    if args.resume_suite:
        first = run_suite(args.resume_suite, args.out, registry=registry, fresh=True, console=Console(quiet=True))
        assert len(first.failed) == len(first.summaries), "the first attempt crashes"
        second = run_suite(args.resume_suite, args.out, registry=registry, console=Console(quiet=True))
        failed += len(second.failed)
    (args.out / f"done-rank{rank()}").write_text(str(failed))


if __name__ == "__main__":
    main()
