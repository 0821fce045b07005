"""Pivot a suite's results into "val ppl per method × sparsity" and a cost table, as markdown.

    python benchmarks/baselines_table.py results/baselines [--model gpt-nano] [--metric val_ppl]

Reads every ``summary.json`` under the suite folder (``sparsebench run`` writes them). The cost
table gives, per method, the mean over sparsities of the measured overhead (wall time inside the
method's hooks, plus Gumbel's in-forward sampling, ÷ training-step time), of the training FLOPs
relative to dense, and the method's extra charged FLOPs relative to its training FLOPs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def load(suite_dir: Path, model: str | None) -> list[dict]:
    rows = []
    for path in sorted(suite_dir.glob("*/summary.json")):
        s = json.loads(path.read_text())
        if s.get("status") == "ok" and (model is None or s.get("model") == model):
            rows.append(s)
    return rows


def pivot(rows: list[dict], metric: str) -> str:
    sparsities = sorted({s["sparsity_target"] for s in rows if s["sparsity_target"] > 0})
    labels = list(dict.fromkeys(s["label"] for s in rows))
    cell = defaultdict(list)
    for s in rows:
        cell[(s["label"], s["sparsity_target"])].append(s[metric])
    lines = ["| method | " + " | ".join(f"{x:g}" for x in sparsities) + " |",
             "|---|" + "---|" * len(sparsities)]
    for label in labels:
        if any((label, x) in cell for x in sparsities):
            values = [f"{statistics.mean(cell[(label, x)]):.2f}" if (label, x) in cell else "—" for x in sparsities]
        else:  # dense: one run, sparsity 0
            dense = statistics.mean(v for (l, _), vs in cell.items() if l == label for v in vs)
            values = [f"{dense:.2f}"] * len(sparsities)
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


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
    print(pivot(rows, args.metric))
    print()
    print("## cost")
    print()
    print(costs(rows))


if __name__ == "__main__":
    main()
