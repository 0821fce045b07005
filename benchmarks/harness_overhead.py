"""Harness overhead, measured side by side in one process.

Prints tokens/s of a dense run through sparsebench vs a bare PyTorch loop on the same model,
data and optimizer (goal: ratio >= 0.98), and the mask upkeep share of step time of a static
sparse run (goal: <= 0.5%). Runs alternate (bare, harness, bare, harness, ...) so drifts in
machine load hit both sides equally.

    python benchmarks/harness_overhead.py [--model gpt-micro] [--steps 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparsebench.config import MethodSpec, RunConfig, TrainingConfig, DataConfig
from sparsebench.loop import train
from sparsebench.registry import load_registry
from sparsebench.schedule import set_lr
from sparsebench.run_setup import setup_run


def run_config(model: str, steps: int, method: MethodSpec, sparsity: float, batch: int, seq_len: int) -> RunConfig:
    return RunConfig(
        suite="bench", run_id=f"bench-{method.name}", method=method, model=model, sparsity=sparsity, seed=0,
        data=DataConfig(dataset="synthetic", seq_len=seq_len),
        training=TrainingConfig(steps=steps, batch_size=batch, lr=1e-3, warmup_steps=5, eval_every=0,
                                eval_batches=1, log_every=10_000, device="cpu"),
    )


def harness_tokens_per_s(cfg: RunConfig, registry) -> tuple[float, float]:
    setup = setup_run(cfg, registry)
    result = train(setup)
    setup.run.metrics.close()
    tokens = cfg.training.steps * setup.run.tokens_per_step
    return tokens / result.timings.step_s, result.timings.upkeep_s / result.timings.step_s


def bare_tokens_per_s(cfg: RunConfig, registry) -> float:
    """The same model, sampler, optimizer and schedule, in the plainest loop possible."""
    setup = setup_run(cfg, registry)  # builds identical model/data/optimizer; its hooks are unused
    model, optimizer, sampler, t = setup.run.model, setup.run.optimizer, setup.sampler, cfg.training
    model.train()
    start = time.perf_counter()
    for step in range(1, t.steps + 1):
        set_lr(optimizer, step, t)
        batch = sampler.next()
        logits = model(input_ids=batch["input_ids"]).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch["labels"].reshape(-1))
        loss.backward()
        float(loss.detach())  # the harness reads the loss every step (NaN check); so does this loop
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    setup.run.metrics.close()
    return t.steps * setup.run.tokens_per_step / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-micro")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    registry = load_registry()
    dense = run_config(args.model, args.steps, MethodSpec(name="dense"), 0.0, args.batch_size, args.seq_len)
    static = run_config(args.model, args.steps, MethodSpec(name="static", config={"distribution": "erk"}), 0.9,
                        args.batch_size, args.seq_len)

    bare, harness, upkeep = [], [], []
    bare_tokens_per_s(dense, registry)  # warm-up: allocator, thread pools, data cache
    for _ in range(args.repeats):
        bare.append(bare_tokens_per_s(dense, registry))
        harness.append(harness_tokens_per_s(dense, registry)[0])
        upkeep.append(harness_tokens_per_s(static, registry)[1])
    b, h = statistics.median(bare), statistics.median(harness)
    print(f"model {args.model}, {args.steps} steps × {args.batch_size}×{args.seq_len} tokens, {args.repeats} repeats, "
          f"torch threads {torch.get_num_threads()}")
    print(f"bare PyTorch loop     : {b:10.0f} tokens/s   (runs: {', '.join(f'{x:.0f}' for x in bare)})")
    print(f"sparsebench (dense)   : {h:10.0f} tokens/s   (runs: {', '.join(f'{x:.0f}' for x in harness)})")
    print(f"ratio harness / bare  : {h / b:10.3f}   (goal >= 0.98)")
    print(f"mask upkeep share     : {100 * statistics.median(upkeep):10.3f} % of step time, static ERK 90% "
          f"(goal <= 0.5%)")


if __name__ == "__main__":
    main()
