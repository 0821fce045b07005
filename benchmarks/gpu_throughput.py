"""sparsebench's GPU path against a bare nanoGPT-style loop, side by side in one process.

1. Tokens/s of a dense run through sparsebench (``training.compile: true``, bf16 autocast, fused
   AdamW or the fused masked-AdamW kernel, pinned prefetch, losses read at log steps only)
   against a bare loop in nanoGPT's style on the same model (``torch.compile``, fused AdamW,
   SDPA attention — flash on CUDA in bf16 —, bf16 autocast, pinned ``non_blocking`` batches,
   the loss never read). Goal: ratio >= 0.95.
2. The mask-upkeep share of step time of a static 90% run: the passes that keep pruned weights
   and gradients at zero, timed alone on the trained model (CUDA events), over the run's step
   time. Goal: <= 1%.

The two loops alternate in every repeat (harness first in even repeats, bare first in odd ones),
so drifts in clocks or load hit both. Each harness segment is a fresh run of ``2 * steps`` steps
logged every ``steps``: the first half absorbs compilation, tokens/s is the second half's.

Data: the embedded synthetic source, whose vocabulary is at most ~1.4k tokens (its transition
table is V²·K), so GPT-2-small's LM head here is 768 × 1024 rather than 768 × 50257.

    python benchmarks/gpu_throughput.py [--model gpt2-small] [--steps 50] [--repeats 3]

Without CUDA the script runs a tiny CPU configuration (gpt-nano, float32, eager) only to show
that it works, and says that the GPU figures need CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from sparsebench.config import DataConfig, MethodSpec, RunConfig, SyntheticConfig, TrainingConfig
from sparsebench.engines import make_engine
from sparsebench.losses import cross_entropy
from sparsebench.loop import train
from sparsebench.models import build_model
from sparsebench.registry import load_registry
from sparsebench.run_setup import setup_run
from sparsebench.schedule import set_lr

CUDA = torch.cuda.is_available()


def run_config(args, method: str, sparsity: float) -> RunConfig:
    return RunConfig(
        suite="bench", run_id=f"bench-{method}", method=MethodSpec(name=method), model=args.model,
        sparsity=sparsity, seed=0,
        data=DataConfig(dataset="synthetic", seq_len=args.seq_len,
                        synthetic=SyntheticConfig(vocab_size=args.vocab, branching=4, candidates=8,
                                                  train_tokens=2_000_000)),
        training=TrainingConfig(steps=2 * args.steps, batch_size=args.batch, lr=6e-4, warmup_steps=10,
                                eval_every=0, eval_batches=1, log_every=args.steps, device=args.device,
                                dtype=args.dtype, compile=args.compile, weight_decay=0.1),
    )


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def harness_segment(cfg: RunConfig, registry) -> tuple[float, object]:
    """One fresh run; tokens/s of its second half (the loop's own log-window measurement)."""
    setup = setup_run(cfg, registry)
    records = []
    train(setup, on_step=lambda step, record: records.append(record))
    setup.run.metrics.close()
    last = [r for r in records if "tokens_per_s" in r][-1]
    return last["tokens_per_s"], setup


class BareLoop:
    """nanoGPT's train.py, reduced to the step: same model and data, nothing read per step."""

    def __init__(self, args, tokens: np.ndarray, vocab: int):
        self.args, self.tokens, self.device = args, tokens, torch.device(args.device)
        self.model = build_model(args.model, vocab, args.seq_len).to(self.device)
        self.cfg = run_config(args, "dense", 0.0).training
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), **({"fused": True} if CUDA else {}))
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.dtype = getattr(torch, args.dtype)
        self.generator = torch.Generator().manual_seed(1)
        self.step_count = 0

    def batch(self):
        high = len(self.tokens) - self.args.seq_len - 1
        starts = torch.randint(0, high + 1, (self.args.batch,), generator=self.generator).numpy()
        rows = torch.from_numpy(np.stack([self.tokens[s: s + self.args.seq_len + 1].astype(np.int64) for s in starts]))
        if CUDA:
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]

    def run(self, steps: int) -> float:
        """Tokens/s over ``steps`` steps (device synchronised at both ends)."""
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.args.dtype != "float32")
        x, y = self.batch()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step_count += 1
            set_lr(self.optimizer, min(self.step_count, self.cfg.steps), self.cfg)
            with autocast:
                logits = self.forward(input_ids=x).logits
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
            x, y = self.batch()  # prefetch the next batch while the device works, as nanoGPT does
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        sync()
        return steps * self.args.batch * self.args.seq_len / (time.perf_counter() - start)


def upkeep_seconds(setup, repeats: int = 50) -> dict[str, float]:
    """Seconds per step of the masking passes the static run's engine runs, timed alone."""
    run = setup.run
    engine = make_engine(setup)
    engine.set_masks(run.masks)
    batch = setup.sampler.next()
    with torch.autocast(run.device.type, dtype=getattr(torch, run.config.training.dtype),
                        enabled=run.config.training.dtype != "float32"):
        loss = cross_entropy(run.model(input_ids=batch["input_ids"]).logits, batch["labels"])
    loss.backward()
    out = {}
    for name, fn in (("mask_grads", engine.upkeep.mask_grads), ("mask_weights", engine.upkeep.mask_weights)):
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        out[name] = (time.perf_counter() - start) / repeats
    run.model.zero_grad(set_to_none=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-small" if CUDA else "gpt-nano")
    parser.add_argument("--seq-len", type=int, default=1024 if CUDA else 64)
    parser.add_argument("--batch", type=int, default=16 if CUDA else 8)
    parser.add_argument("--vocab", type=int, default=1024 if CUDA else 128)
    parser.add_argument("--steps", type=int, default=50 if CUDA else 10, help="measured steps per segment")
    parser.add_argument("--repeats", type=int, default=3 if CUDA else 2)
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=CUDA)
    args = parser.parse_args()
    args.device, args.dtype = ("cuda", "bfloat16") if CUDA else ("cpu", "float32")
    if not CUDA:
        print("No CUDA device: a tiny CPU configuration only checks that this script works; "
              "the GPU figures (goals: >= 0.95x nanoGPT, upkeep <= 1%) need CUDA.")
    registry = load_registry()
    dense, static = run_config(args, "dense", 0.0), run_config(args, "static", 0.9)

    first = setup_run(dense, registry)  # the data (cached) and the vocabulary for the bare loop
    bare = BareLoop(args, np.asarray(first.run.data.train), first.run.data.vocab_size)
    header = (f"{args.model}, batch {args.batch} x {args.seq_len} tokens, {args.dtype}, "
              f"{'compiled' if args.compile else 'eager'}, {args.device}; {first.kernels} kernels")
    del first
    bare.run(args.steps)  # compile and warm up once

    ratios, harness_rates, bare_rates = [], [], []
    for repeat in range(args.repeats):
        order = ("harness", "bare") if repeat % 2 == 0 else ("bare", "harness")
        rates = {}
        for side in order:
            rates[side] = harness_segment(dense, registry)[0] if side == "harness" else bare.run(args.steps)
        harness_rates.append(rates["harness"])
        bare_rates.append(rates["bare"])
        ratios.append(rates["harness"] / rates["bare"])
        print(f"  repeat {repeat}: sparsebench {rates['harness']:,.0f} tok/s, bare {rates['bare']:,.0f} tok/s, "
              f"ratio {ratios[-1]:.3f}")

    static_rate, static_setup = harness_segment(static, registry)
    upkeep = upkeep_seconds(static_setup)
    step_s = static_setup.run.tokens_per_step / static_rate
    # the fused masked-AdamW kernel re-masks the weights inside the step: only the gradient pass remains
    passes = ["mask_grads"] if static_setup.kernels == "triton" else ["mask_grads", "mask_weights"]
    share = sum(upkeep[p] for p in passes) / step_s

    print(f"\n{header}")
    print(f"dense tokens/s: sparsebench {statistics.median(harness_rates):,.0f}, bare nanoGPT-style "
          f"{statistics.median(bare_rates):,.0f}; ratio (median of {args.repeats}) "
          f"{statistics.median(ratios):.3f}  (goal >= 0.95)")
    print(f"static 90%: step {step_s * 1e3:.2f} ms; upkeep ({' + '.join(passes)}) "
          f"{sum(upkeep[p] for p in passes) * 1e3:.3f} ms = {share:.2%} of a step  (goal <= 1%)")
    if not CUDA:
        print("GPU figures need CUDA: the numbers above are a CPU smoke check of the script, not the goals.")


if __name__ == "__main__":
    main()
