"""Results: ``summary.json`` per run; ``summary.csv``, ``table.csv``, ``table.md``, ``table.tex``,
``runs.json`` and ``plots/`` per suite (the tables themselves are built in :mod:`sparsebench.tables`).

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


def read_summaries(suite_dir: Path, run_ids: Optional[Iterable[str]] = None) -> list[dict]:
    """Every ``*/summary.json`` under ``suite_dir`` (or only those of ``run_ids``, in that order)."""
    if run_ids is None:
        paths = sorted(Path(suite_dir).glob("*/summary.json"))
    else:
        paths = [Path(suite_dir) / run_id / "summary.json" for run_id in run_ids]
    out = []
    for path in paths:
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # a foreign, damaged or not yet written file never stops a report
        if isinstance(summary, dict):  # valid JSON that is not an object is foreign too
            out.append(summary)
    return out


def read_runs(suite_dir: Path, run_ids: Optional[Iterable[str]] = None) -> list[dict]:
    """The summaries, each with its run's resolved ``config`` (config.yaml) and ``downstream``
    results (eval.json, see :mod:`sparsebench.downstream`) attached for the tables."""
    records = []
    for summary in read_summaries(suite_dir, run_ids):
        run_dir = Path(suite_dir) / str(summary.get("run_id"))
        record = dict(summary)
        try:
            record["config"] = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            pass
        downstream = read_downstream(run_dir)
        if downstream:
            record["downstream"] = downstream
        records.append(record)
    return records


def read_downstream(run_dir: Path) -> dict[str, float]:
    """``eval.json``'s headline numbers: ``{"glue/sst2": 0.81, "lm_eval/hellaswag": 0.27}``."""
    try:
        data = json.loads((Path(run_dir) / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v["score"] for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("score"), (int, float))}


# --------------------------------------------------------------------------------------------
# the suite's current runs
# --------------------------------------------------------------------------------------------

MANIFEST = "runs.json"
EVAL_FILE = "eval.json"


def write_manifest(suite_dir: Path, suite_name: str, run_ids: list[str]) -> None:
    """``runs.json``: the run ids of the suite as it was last run (what its tables show)."""
    write_json(Path(suite_dir) / MANIFEST, {"suite": suite_name, "run_ids": list(run_ids)})


def current_run_ids(suite_dir: Path) -> Optional[list[str]]:
    """The run ids of the suite's last ``run`` (``None`` when the folder has no manifest)."""
    try:
        data = json.loads((Path(suite_dir) / MANIFEST).read_text(encoding="utf-8"))
        return [str(r) for r in data["run_ids"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def summaries_frame(summaries: Iterable[dict]) -> pd.DataFrame:
    """``summary.csv``: one row per run, numbers as numbers, swept config keys as columns."""
    from sparsebench.tables import downstream_columns, group_runs, swept_keys

    summaries = list(summaries)
    groups = group_runs(summaries)
    swept = swept_keys([flat for flat, _ in groups])
    flats = {id(r): flat for flat, runs in groups for r in runs}
    rows = []
    for s in summaries:
        row = {k: s.get(k) for k in SUMMARY_KEYS if k not in ("layer_density", "method_config", "versions")}
        row["label"] = s.get("label", s.get("method"))
        row["entropy_floor_ppl"] = s.get("entropy_floor_ppl")
        row["sparsity_model"] = s.get("sparsity_model")
        row["method_config"] = json.dumps(s.get("method_config", {}), sort_keys=True)
        row["warnings"] = len(s.get("warnings") or [])
        row.update({key: flats[id(s)].get(key) for key in swept})
        row.update({key: (s.get("downstream") or {}).get(key) for key in downstream_columns(summaries)})
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_table(summaries: list[dict]) -> pd.DataFrame:
    """The numeric comparison table (``table.csv``), see :func:`sparsebench.tables.numeric_table`."""
    from sparsebench.tables import numeric_table

    return numeric_table(summaries)


def entropy_floor(summaries: list[dict]) -> Optional[float]:
    floors = {s.get("entropy_floor_ppl") for s in summaries if s.get("entropy_floor_ppl")}
    return floors.pop() if len(floors) == 1 else None


def render_markdown(table: pd.DataFrame, title: str, floor: Optional[float]) -> str:
    from sparsebench import tables

    return tables.render_markdown(table, title, floor)


def write_suite_tables(
    suite_dir: Path,
    suite_name: str,
    run_ids: Optional[list[str]] = None,
    final: bool = False,
) -> pd.DataFrame:
    """(Re)write ``summary.csv``, ``table.csv`` and ``table.md`` of a suite.

    ``run_ids``: the runs of the suite as it is now (``run`` passes them, and they are recorded in
    ``runs.json``); ``None`` reads the ids from ``runs.json``, or every run in the folder if there
    is none. ``final``: also write ``table.tex`` and ``plots/`` (:mod:`sparsebench.plots`), which
``run`` does once at the end of the suite and ``report`` every time. Returns the display
    table. Nothing is written when no run has a summary yet (a table is never emptied).
    """
    from sparsebench import tables

    suite_dir = Path(suite_dir)
    if run_ids is not None:
        write_manifest(suite_dir, suite_name, run_ids)
    else:
        run_ids = current_run_ids(suite_dir)
    records = read_runs(suite_dir, run_ids)
    numeric = tables.numeric_table(records)
    if not records:
        return tables.display_table(numeric)
    floor = entropy_floor(records)
    atomic_write_text(suite_dir / "summary.csv", summaries_frame(records).to_csv(index=False))
    atomic_write_text(suite_dir / "table.csv", numeric.to_csv(index=False))
    display = tables.display_table(numeric)
    atomic_write_text(suite_dir / "table.md", tables.markdown_text(display, suite_name, floor))
    if final:
        from sparsebench.plots import write_plots

        caption = f"{suite_name}: mean ± std over seeds"
        atomic_write_text(suite_dir / "table.tex", tables.render_latex(numeric, caption=caption))

        write_plots(suite_dir, records)
    return display
