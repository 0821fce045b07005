"""Pivot a suite's results into "val ppl per method × sparsity" and a cost table, as markdown.

    python benchmarks/baselines_table.py results/baselines [--model gpt-nano] [--metric val_ppl]

Reads the suite's current runs (``runs.json``, else every ``summary.json``; ``sparsebench run``
writes them); the pivot is :func:`sparsebench.tables.pivot_table`, as ``sparsebench report
--pivot`` prints it. The cost
table gives, per method, the mean over sparsities of the measured overhead (wall time inside the
method's hooks, plus Gumbel's in-forward sampling, ÷ training-step time), of the training FLOPs
relative to dense, and the method's extra charged FLOPs relative to its training FLOPs.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from sparsebench.results import current_run_ids, read_runs
from sparsebench.tables import numeric_table, pivot_table, render_pivot


def load(suite_dir: Path, model: str | None) -> list[dict]:
    rows = read_runs(suite_dir, current_run_ids(suite_dir))
    return [s for s in rows if s.get("status") == "ok" and (model is None or s.get("model") == model)]


def pivot(rows: list[dict], metric: str) -> str:
    return render_pivot(pivot_table(numeric_table(rows, metrics=[metric]), metric))


def costs(rows: list[dict]) -> str:
    by_label = defaultdict(list)
    for s in rows:
        by_label[s["label"]].append(s)
    lines = ["| method | overhead % (mean, min–max) | train FLOPs ×dense (per sparsity) | extra charged FLOPs |",
             "|---|---|---|---|"]
    for label, runs in by_label.items():
        over = [100 * s["overhead_frac"] for s in runs]
        flops = ", ".join(f"{s['train_flops_vs_dense']:.3f}" for s in sorted(runs, key=lambda r: r["sparsity_target"]))
        extra = [sum(v for k, v in s.get("flops_by_name", {}).items() if k != "train") / s["train_flops"] for s in runs]
        lines.append(f"| {label} | {statistics.mean(over):.2f} ({min(over):.2f}–{max(over):.2f}) | {flops} | "
                     f"{100 * statistics.mean(extra):.3f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite_dir", type=Path)
    parser.add_argument("--model", default=None, help="only runs of this model preset")
    parser.add_argument("--metric", default="val_ppl")
    args = parser.parse_args()
    rows = load(args.suite_dir, args.model)
    if not rows:
        raise SystemExit(f"no finished runs under {args.suite_dir}")
    print(f"## {args.metric} — {args.suite_dir.name}" + (f", {args.model}" if args.model else ""))
    print()
    print(pivot(rows, args.metric).rstrip())
    print()
    print("## cost")
    print()
    print(costs(rows))


if __name__ == "__main__":
    main()
