"""SparsAE's mask-search overhead and memory, measured side by side on the CPU smoke model.

Prints the share of training time spent in the mask search (``sparsae_search_time_frac``) for
λ ∈ {1, 3, 5} at two values of K (goal: ≤ 5% at K = 100, λ = 3), and the peak memory of λ = 1
vs λ = 5 (goal: within 5%). Time shares come from one process, runs alternating over the
configurations in each repeat so that drifts in machine load hit all of them alike. Each memory
figure comes from a fresh child process (peak RSS is per process), λ = 1 and λ = 5 alternating.

    python benchmarks/sparsae_overhead.py [--steps 300] [--ks 100 50] [--repeats 1] [--search-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sparsebench.config import MethodSpec
from sparsebench.loop import train
from sparsebench.memory import _read_status_kib
from sparsebench.registry import load_registry
from sparsebench.run_setup import setup_run
from sparsebench.suites import expand_suite
from sparsebench.summary import build_summary

SMOKE = Path(__file__).parents[1] / "suites" / "smoke.yaml"


def smoke_config(registry, steps: int, options: dict):
    """The smoke suite's data, model and training, with ``sparsae`` and ``options``."""
    cfg = expand_suite(SMOKE, registry)[1][0]
    training = cfg.training.model_copy(update={"steps": steps, "eval_every": 0, "log_every": 10_000})
    method = MethodSpec(name="sparsae", config=registry.get("sparsae").Config(**options).model_dump())
    return cfg.model_copy(update={"method": method, "training": training, "sparsity": 0.9, "run_id": "bench"})


def run_once(registry, steps: int, options: dict) -> dict:
    setup = setup_run(smoke_config(registry, steps, options), registry)
    baseline = (_read_status_kib("VmRSS") or 0) * 1024
    try:
        result = train(setup)
        summary = build_summary(setup, result)
    finally:
        setup.run.metrics.close()
    summary["rss_at_start_bytes"] = baseline
    return summary


def child_memory(lambda_: int, steps: int, k: int, search_only: bool) -> None:
    registry = load_registry()
    options = {"lambda_": lambda_, "mask_update_every": k, "distill": not search_only}
    s = run_once(registry, steps, options)
    print(json.dumps({k: s[k] for k in ("peak_memory_bytes", "rss_at_start_bytes", "sparsae_candidate_bytes_peak",
                                        "sparsae_updates")}))


def memory_pair(steps: int, k: int, repeats: int, search_only: bool) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {1: [], 5: []}
    for _ in range(repeats):
        for lam in (1, 5):
            args = [sys.executable, __file__, "--child-memory", str(lam), "--steps", str(steps), "--ks", str(k)]
            proc = subprocess.run(args + (["--search-only"] if search_only else []), capture_output=True, text=True,
                                  check=True)
            out[lam].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ks", type=int, nargs="+", default=[100, 50])
    parser.add_argument("--lambdas", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory-steps", type=int, default=100)
    parser.add_argument("--search-only", action="store_true", help="no EMA teacher (a shorter step: a larger share)")
    parser.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        child_memory(args.child_memory, args.steps, args.ks[0], args.search_only)
        return

    import torch

    registry = load_registry()
    configs = [(k, lam) for k in args.ks for lam in args.lambdas]
    shares: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    started = time.perf_counter()
    for _ in range(args.repeats):
        for k, lam in configs:
            s = run_once(registry, args.steps, {"lambda_": lam, "mask_update_every": k, "distill": not args.search_only})
            shares[(k, lam)].append(s["sparsae_search_time_frac"])
    variant = "search only (distill: false)" if args.search_only else "full sparsae"
    print(f"gpt-nano (smoke suite), {args.steps} steps, {variant}, {args.repeats} repeat(s), "
          f"torch threads {torch.get_num_threads()}")
    print("mask-search share of training time (sparsae_search_time_frac):")
    print("   K  " + "".join(f"   λ={lam:<6}" for lam in args.lambdas))
    for k in args.ks:
        row = "".join(f"  {100 * statistics.median(shares[(k, lam)]):6.2f} % " for lam in args.lambdas)
        print(f"{k:4d}  {row}")
    if 100 in args.ks and 3 in args.lambdas:
        print(f"goal: ≤ 5% at K = 100, λ = 3 → {100 * statistics.median(shares[(100, 3)]):.2f} %")

    k_mem = min(args.ks)
    mem = memory_pair(args.memory_steps, k_mem, max(args.repeats, 2), args.search_only)
    peak = {lam: statistics.median(r["peak_memory_bytes"] for r in rows) for lam, rows in mem.items()}
    growth = {lam: statistics.median(r["peak_memory_bytes"] - r["rss_at_start_bytes"] for r in rows)
              for lam, rows in mem.items()}
    cand = {lam: max(r["sparsae_candidate_bytes_peak"] for r in rows) for lam, rows in mem.items()}
    print(f"peak memory, {args.memory_steps} steps, K = {k_mem} (fresh process each, median of {len(mem[1])}):")
    for lam in (1, 5):
        print(f"  λ={lam}: peak RSS {peak[lam] / 2**20:8.1f} MiB   growth during training {growth[lam] / 2**20:7.1f} MiB"
              f"   candidate swap lists {cand[lam] / 1024:6.1f} KiB")
    print(f"ratio λ=5 / λ=1: peak {peak[5] / peak[1]:.4f}, growth {growth[5] / max(growth[1], 1):.4f} (goal: within 5%)")
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
