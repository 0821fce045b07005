"""Comparison tables: one row per configuration (every seed of it), every swept key a column.

A row groups the runs whose resolved configurations (``config.yaml``) differ only in the seed,
the run id and what merely observes (logging cadence, checkpoint cadence, observer plugins).
Keys whose value differs between rows become columns, so two learning rates are two rows with an
``training.lr`` column, never "two seeds".

The numeric table (``table.csv``) has ``<metric>_mean``, ``<metric>_std`` and ``n_seeds``
columns; markdown and LaTeX are rendered from it with pandas (``to_markdown``,
``Styler.to_latex``).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable, Iterable, Optional

import pandas as pd

# Keys of a run's config that never change what is trained (see the module docstring).
NOT_IDENTITY = {"run_id", "seed", "suite", "training.log_every", "training.checkpoint_every",
                "training.keep_checkpoints"}
# Observers known without loading the registry (the first-party loggers and the progress bar).
KNOWN_OBSERVERS = {"tensorboard", "wandb", "csv", "progress"}

# metric key in summary.json → (column title, format, lower is better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "val_ppl": ("val ppl", ".2f", True),
    "test_ppl": ("test ppl", ".2f", True),
    "train_flops_vs_dense": ("train FLOPs ×dense", ".3f", True),
    "inference_flops_vs_dense": ("inference FLOPs ×dense", ".3f", True),
    "overhead_pct": ("overhead %", ".2f", True),
    "wall_time_s": ("wall s", ".1f", True),
}
# downstream results (eval.json) join the table as columns; higher is better
DOWNSTREAM_FORMAT = ".3f"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"training": {"lr": 1}}`` → ``{"training.lr": 1}``; lists become JSON text."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}{key}."))
        return out or ({prefix[:-1]: "{}"} if prefix else {})
    if isinstance(value, (list, tuple)):
        value = json.dumps(value, sort_keys=True)
    return {prefix[:-1]: value}


@functools.lru_cache(maxsize=None)  # the registry is loaded once per process, and only for unknown names
def _default_is_observer(name: str) -> bool:
    if name in KNOWN_OBSERVERS:
        return True
    try:
        from sparsebench.registry import load_registry

        return bool(getattr(load_registry().get(name), "observer", False))
    except Exception:  # an uninstalled plugin: count it as part of the configuration
        return False


def run_config(record: dict, is_observer: Callable[[str], bool]) -> dict[str, Any]:
    """The flattened configuration that identifies a run's row (seed and observers left out).

    ``record["config"]`` is the run's ``config.yaml``; a summary without one (written by hand or
    by an old version) is identified by its label, method options, sparsity and model.
    """
    config = record.get("config")
    if not config:
        config = {"method": {"name": record.get("method"), "label": record.get("label"),
                             "config": record.get("method_config") or {}},
                  "sparsity": record.get("sparsity_target"), "model": record.get("model")}
    config = dict(config)
    config["plugins"] = [p for p in config.get("plugins") or [] if not is_observer(str(p.get("name")))]
    if not config["plugins"]:
        config.pop("plugins")
    flat = flatten(config)
    return {k: v for k, v in flat.items() if k not in NOT_IDENTITY}


def _label(record: dict) -> str:
    return str(record.get("label") or record.get("method"))


def group_runs(records: Iterable[dict], is_observer: Optional[Callable[[str], bool]] = None):
    """``[(flat config, [records])]`` in first-seen order, one entry per distinct configuration."""
    cache: dict[str, bool] = {}

    def observer(name: str) -> bool:
        if name not in cache:
            cache[name] = (is_observer or _default_is_observer)(name)
        return cache[name]

    groups: dict[str, tuple[dict, list]] = {}
    for record in records:
        flat = run_config(record, observer)
        key = json.dumps(flat, sort_keys=True, default=str)
        groups.setdefault(key, (flat, []))[1].append(record)
    return list(groups.values())


def swept_keys(configs: list[dict]) -> list[str]:
    """Config keys whose value differs between rows (method options only within one method)."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    out = []
    for key in keys:
        if key in ("sparsity", "model", "method.name", "method.label"):
            continue  # shown as the method/sparsity/model columns
        if key.startswith("method."):  # options and components: compared within one method only
            by_method: dict[Any, set] = {}
            for c in configs:
                by_method.setdefault(c.get("method.name"), set()).add(json.dumps(c.get(key), default=str))
            if any(len(v) > 1 for v in by_method.values()):
                out.append(key)
            continue
        if len({json.dumps(c.get(key), default=str) for c in configs}) > 1:
            out.append(key)
    return out


def _column_name(key: str) -> str:
    return key.removeprefix("method.config.")


def downstream_columns(records: Iterable[dict]) -> list[str]:
    """Columns from the runs' ``eval.json`` (``glue/sst2``, ``lm_eval/hellaswag``, ...)."""
    return list(dict.fromkeys(k for r in records for k in (r.get("downstream") or {})))


def _model_name(record: dict) -> str:
    return str(record.get("model") if record.get("model") is not None else "")


def numeric_table(
    records: list[dict],
    is_observer: Optional[Callable[[str], bool]] = None,
    metrics: Iterable[str] = (),
) -> pd.DataFrame:
    """One row per configuration: identifying columns, then ``<metric>_mean/_std`` and ``n_seeds``.

    Means and standard deviations are over the runs that finished (``status == ok``); ``n_failed``
    counts the others and ``error`` holds the first failure's one-line reason.
    """
    groups = group_runs(records, is_observer)
    swept = swept_keys([flat for flat, _ in groups])
    extra = [m for m in metrics if m not in METRICS] + downstream_columns(records)
    rows = []
    for flat, runs in groups:
        ok = [r for r in runs if r.get("status") == "ok"]
        row: dict[str, Any] = {"method": _label(runs[0]), "sparsity": runs[0].get("sparsity_target"),
                               "model": _model_name(runs[0])}
        row.update({_column_name(k): flat.get(k) for k in swept})
        row["n_seeds"] = len(runs)
        row["seeds"] = " ".join(str(r.get("seed")) for r in runs)
        for key in list(METRICS) + extra:
            values = [_metric(r, key) for r in ok]
            values = [v for v in values if v is not None and math.isfinite(v)]
            row[f"{key}_mean"] = sum(values) / len(values) if values else math.nan
            row[f"{key}_std"] = pd.Series(values, dtype=float).std(ddof=1) if len(values) > 1 else math.nan
        row["warnings"] = sum(len(r.get("warnings") or []) for r in ok)  # summary.json's collapsed layers etc.
        failed = [r for r in runs if r.get("status") != "ok"]
        row["n_failed"] = len(failed)
        row["status"] = "ok" if not failed else "failed"
        row["error"] = failed[0].get("error") if failed else None
        rows.append(row)
    return pd.DataFrame(rows)


def _metric(record: dict, key: str) -> Optional[float]:
    if key == "overhead_pct":
        value = record.get("overhead_frac")
        return None if value is None else 100 * float(value)
    if key in (record.get("downstream") or {}):
        return _number(record["downstream"][key])
    return _number(record.get(key))


def _number(value: Any) -> Optional[float]:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# display
# --------------------------------------------------------------------------------------------


def metric_titles(numeric: pd.DataFrame) -> dict[str, tuple[str, str, bool]]:
    """Metric key → (title, format, lower is better) for every metric column of ``numeric``."""
    keys = [c[: -len("_mean")] for c in numeric.columns if c.endswith("_mean")]
    # a downstream score is better higher (accuracy, F1, MCC) unless it is a perplexity (lm-eval's
    # word/byte perplexity), so the bold "best" of table.tex points the right way
    return {k: METRICS.get(k, (k, DOWNSTREAM_FORMAT, "perplexity" in k)) for k in keys}


def _mean_std(mean: float, std: float, fmt: str) -> str:
    if mean is None or not math.isfinite(mean):
        return "—"
    if std is None or not math.isfinite(std):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def _cell(value: Any) -> Any:
    """An identifying cell as shown: ``—`` where a row has no such key (e.g. a method without that option)."""
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:g}"
    return value


def display_table(numeric: pd.DataFrame) -> pd.DataFrame:
    """The human table: ``mean ± std`` strings, a ``seeds`` count and a status column."""
    if numeric.empty:
        return pd.DataFrame(columns=["method", "sparsity", "model", "seeds", "status"])
    ident = [c for c in numeric.columns if c not in ("n_seeds", "seeds", "n_failed", "status", "error", "warnings")
             and not c.endswith(("_mean", "_std"))]
    out = numeric[ident].astype(object).map(_cell)
    out["sparsity"] = [f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in numeric["sparsity"]]
    out["seeds"] = numeric["n_seeds"]
    for key, (title, fmt, _) in metric_titles(numeric).items():
        out[title] = [_mean_std(m, s, fmt) for m, s in zip(numeric[f"{key}_mean"], numeric[f"{key}_std"])]
    out["status"] = [
        "ok" if n == 0 else f"FAILED ({n}/{total}): {err}"
        for n, total, err in zip(numeric["n_failed"], numeric["n_seeds"], numeric["error"])
    ]
    out["warnings"] = [f"⚠ {n}" if n else "" for n in numeric["warnings"]]  # see each run's summary.json
    return out.fillna("—").reset_index(drop=True)


def best_rows(numeric: pd.DataFrame) -> dict[str, set[int]]:
    """Display column title → row positions holding that column's best mean."""
    out = {}
    for key, (title, _, lower) in metric_titles(numeric).items():
        values = pd.to_numeric(numeric[f"{key}_mean"], errors="coerce")
        if values.notna().sum() < 2:
            continue
        best = values.min() if lower else values.max()
        out[title] = {i for i, v in enumerate(values) if v == best}
    return out


def render_markdown(numeric: pd.DataFrame, title: str, floor: Optional[float] = None) -> str:
    """``# title``, the synthetic-data floor if known, then the table (``DataFrame.to_markdown``)."""
    return markdown_text(display_table(numeric), title, floor)


def markdown_text(display: pd.DataFrame, title: str, floor: Optional[float] = None) -> str:
    """:func:`render_markdown` of a table already made by :func:`display_table`."""
    lines = [f"# {title}", ""]
    if floor:
        lines += [f"Synthetic data: the perplexity floor exp(H) is **{floor:.3f}**.", ""]
    lines.append(display.to_markdown(index=False, disable_numparse=True))
    return "\n".join(lines) + "\n"


def render_latex(numeric: pd.DataFrame, caption: Optional[str] = None) -> str:
    """A booktabs LaTeX table (``Styler.to_latex``): text escaped, the best value per column bold."""
    table = display_table(numeric)
    best = best_rows(numeric)

    def bold(frame: pd.DataFrame) -> pd.DataFrame:
        css = pd.DataFrame("", index=frame.index, columns=frame.columns)
        for column, rows in best.items():
            for i in rows:
                css.iloc[i, frame.columns.get_loc(column)] = "textbf: --rwrap;"
        return css

    styler = table.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    styler = styler.apply(bold, axis=None)
    text = styler.to_latex(hrules=True, caption=_escape_latex(caption) if caption else None,
                           column_format="l" * len(table.columns), position="t" if caption else None)
    return text.replace("±", r"$\pm$").replace("×", r"$\times$").replace("—", "--")


def _escape_latex(text: str) -> str:
    return pd.DataFrame([[text]]).style.format(escape="latex").to_latex().splitlines()[2].split(" & ")[-1].rstrip(" \\")


def pivot_table(numeric: pd.DataFrame, metric: str = "val_ppl") -> pd.DataFrame:
    """Method × sparsity (columns) of ``metric``'s mean, a row block per model, as in the papers.

    Rows are the methods with their swept keys (e.g. ``rigl (lr=0.01)``); a method run only
    dense (sparsity 0, e.g. ``dense``) fills every sparsity column, as the reference.
    """
    if numeric.empty:
        return pd.DataFrame()
    column = f"{metric}_mean"
    swept = [c for c in numeric.columns if c not in _NON_SWEPT and not c.endswith(("_mean", "_std"))]
    models = list(dict.fromkeys(numeric["model"]))
    sparsities = sorted({float(s) for s in numeric["sparsity"] if s}) or [0.0]
    cells: dict[tuple, dict[float, list]] = {}
    for _, row in numeric.iterrows():
        extra = ", ".join(f"{k.split('.')[-1]}={row[k]}" for k in swept if pd.notna(row[k]))
        key = (row["model"], f"{row['method']} ({extra})" if extra else str(row["method"]))
        cells.setdefault(key, {}).setdefault(float(row["sparsity"] or 0.0), []).append(row[column])
    rows = []
    for (model, method), values in cells.items():
        out: dict[str, Any] = {"model": model} if len(models) > 1 else {}
        out["method"] = method
        dense_only = set(values) == {0.0}
        for s in sparsities:
            vals = values[0.0] if dense_only else values.get(s, [math.nan])
            out[f"{s:g}"] = sum(vals) / len(vals)
        rows.append(out)
    return pd.DataFrame(rows)


_NON_SWEPT = {"method", "sparsity", "model", "n_seeds", "seeds", "n_failed", "status", "error", "warnings"}


def render_pivot(pivot: pd.DataFrame, fmt: str = ".2f") -> str:
    return pivot.to_markdown(index=False, floatfmt=fmt, missingval="—") + "\n"
