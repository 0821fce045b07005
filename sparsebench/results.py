"""Results: ``summary.json`` per run, ``summary.csv`` and ``table.md`` per suite.

Every file is written atomically (:mod:`sparsebench.atomic`): a kill at any instant leaves the
old or the new file, never a torn one.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd
import yaml

import sparsebench
from sparsebench.atomic import atomic_write_text

SUMMARY_KEYS = [
    "suite", "run_id", "method", "method_config", "model", "n_params", "n_sparsifiable",
    "sparsity_target", "sparsity_actual", "layer_density", "seed", "steps", "tokens", "val_loss",
    "val_ppl", "test_loss", "test_ppl", "train_flops", "train_flops_vs_dense", "inference_flops",
    "inference_flops_vs_dense", "wall_time_s", "method_time_s", "overhead_frac",
    "peak_memory_bytes", "status", "error", "versions",
]


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "sparsebench": sparsebench.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(_finite(data), indent=2, sort_keys=False) + "\n")


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_run_config(path: Path, config: dict) -> None:
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))


def read_summaries(suite_dir: Path) -> list[dict]:
    out = []
    for path in sorted(Path(suite_dir).glob("*/summary.json")):
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue  # a foreign or damaged file never stops a report
    return out


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def summaries_frame(summaries: Iterable[dict]) -> pd.DataFrame:
    rows = []
    for s in summaries:
        row = {k: s.get(k) for k in SUMMARY_KEYS if k not in ("layer_density", "method_config", "versions")}
        row["label"] = s.get("label", s.get("method"))
        row["entropy_floor_ppl"] = s.get("entropy_floor_ppl")
        row["sparsity_model"] = s.get("sparsity_model")
        row["method_config"] = json.dumps(s.get("method_config", {}), sort_keys=True)
        row["warnings"] = len(s.get("warnings") or [])
        rows.append(row)
    return pd.DataFrame(rows)


def _mean_std(values: pd.Series, fmt: str) -> str:
    values = values.dropna()
    if values.empty:
        return "—"
    if len(values) == 1:
        return format(values.iloc[0], fmt)
    return f"{format(values.mean(), fmt)} ± {format(values.std(ddof=1), fmt)}"


TABLE_COLUMNS = [
    "method", "sparsity", "model", "seeds", "val ppl", "test ppl", "train FLOPs ×dense",
    "inference FLOPs ×dense", "overhead %", "wall s", "status", "warnings",
]


def comparison_table(summaries: list[dict]) -> pd.DataFrame:
    """One row per (method label, sparsity, model); ppl as mean ± std over seeds."""
    df = summaries_frame(summaries)
    if df.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    rows = []
    for (label, sparsity, model), g in df.groupby(["label", "sparsity_target", "model"], sort=False, dropna=False):
        ok = g[g["status"] == "ok"]
        failed = len(g) - len(ok)
        rows.append({
            "method": label,
            "sparsity": f"{sparsity:g}",
            "model": model,
            "seeds": len(g),
            "val ppl": _mean_std(ok["val_ppl"], ".2f"),
            "test ppl": _mean_std(ok["test_ppl"], ".2f"),
            "train FLOPs ×dense": _mean_std(ok["train_flops_vs_dense"], ".3f"),
            "inference FLOPs ×dense": _mean_std(ok["inference_flops_vs_dense"], ".3f"),
            "overhead %": _mean_std(ok["overhead_frac"] * 100, ".2f"),
            "wall s": _mean_std(ok["wall_time_s"], ".1f"),
            "status": "ok" if not failed else f"FAILED ({failed}/{len(g)}): {g.loc[g['status'] != 'ok', 'error'].iloc[0]}",
            "warnings": f"⚠ {int(ok['warnings'].sum())}" if ok["warnings"].sum() else "",  # summary.json's warnings
        })
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def entropy_floor(summaries: list[dict]) -> Optional[float]:
    floors = {s.get("entropy_floor_ppl") for s in summaries if s.get("entropy_floor_ppl")}
    return floors.pop() if len(floors) == 1 else None


def render_markdown(table: pd.DataFrame, title: str, floor: Optional[float]) -> str:
    lines = [f"# {title}", ""]
    if floor:
        lines += [f"Synthetic data: the perplexity floor exp(H) is **{floor:.3f}**.", ""]
    header = list(table.columns)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(str(row[c]).replace("|", "/") for c in header) + " |")
    return "\n".join(lines) + "\n"


def render_latex(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    esc = lambda s: str(s).replace("%", r"\%").replace("_", r"\_").replace("±", r"$\pm$").replace("×", r"$\times$")
    lines = [r"\begin{tabular}{" + "l" * len(cols) + "}", r"\toprule", " & ".join(map(esc, cols)) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(row[c]) for c in cols) + r" \\" for _, row in table.iterrows()]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_suite_tables(suite_dir: Path, suite_name: str) -> pd.DataFrame:
    """(Re)write ``summary.csv`` and ``table.md`` from every run's ``summary.json``."""
    summaries = read_summaries(suite_dir)
    atomic_write_text(Path(suite_dir) / "summary.csv", summaries_frame(summaries).to_csv(index=False))
    table = comparison_table(summaries)
    atomic_write_text(Path(suite_dir) / "table.md", render_markdown(table, suite_name, entropy_floor(summaries)))
    return table
