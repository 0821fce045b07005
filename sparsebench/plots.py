"""Figures of a suite, written to ``<suite>/plots/`` as PNG and SVG (matplotlib, headless).

- ``pareto``: validation perplexity against training FLOPs relative to dense, a marker per
  method, one point per sparsity, error bars over seeds, the dense model as the reference;
- ``layer_density``: the final density of every logical layer, per method and sparsity;
- ``curves``: validation loss against training tokens (``metrics.jsonl``), a line per run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")  # no display: batch jobs, CI; must precede pyplot's import

import matplotlib.pyplot as plt  # noqa: E402

from sparsebench.atomic import atomic_write_via  # noqa: E402
from sparsebench.tables import group_runs  # noqa: E402

MARKERS = "osD^v<>pP*Xh"
FORMATS = ("png", "svg")


def write_plots(suite_dir: Path, records: list[dict]) -> list[Path]:
    """Write every figure for ``records`` (see :func:`sparsebench.results.read_runs`); returns the files."""
    out_dir = Path(suite_dir) / "plots"
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        return []
    written = []
    for name, draw in (("pareto", pareto), ("layer_density", layer_density), ("curves", curves)):
        fig = draw(ok, Path(suite_dir))
        if fig is None:
            continue
        for fmt in FORMATS:
            path = out_dir / f"{name}.{fmt}"
            atomic_write_via(path, lambda tmp, fig=fig, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=120,
                                                                                    bbox_inches="tight"))
            written.append(path)
        plt.close(fig)
    return written


def _extra(flat: dict, swept: list[str]) -> str:
    """The swept keys that tell configurations of one method apart, e.g. ``lr=0.001``."""
    return ", ".join(f"{k.split('.')[-1]}={flat.get(k)}" for k in swept if k in flat)


def _series(records: list[dict]) -> list[dict[str, Any]]:
    """One entry per configuration: its label (method and swept keys but sparsity), model, runs."""
    from sparsebench.tables import swept_keys

    groups = group_runs(records)
    swept = [k for k in swept_keys([flat for flat, _ in groups])]
    out = []
    for flat, runs in groups:
        method = str(runs[0].get("label") or runs[0].get("method"))
        extra = _extra(flat, swept)
        out.append({"label": f"{method} ({extra})" if extra else method, "method": method, "extra": extra,
                    "model": str(runs[0].get("model")), "sparsity": runs[0].get("sparsity_target") or 0.0,
                    "runs": runs})
    return out


def _mean_std(values: Iterable[Any]) -> tuple[float, float]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def pareto(records: list[dict], suite_dir: Path):
    series = _series(records)
    models = list(dict.fromkeys(s["model"] for s in series))
    fig, axes = plt.subplots(1, len(models), figsize=(6.4 * len(models), 4.8), squeeze=False)
    methods = list(dict.fromkeys(s["method"] for s in series))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, model in zip(axes[0], models):
        for s in (s for s in series if s["model"] == model):
            x, _ = _mean_std(r.get("train_flops_vs_dense") for r in s["runs"])
            y, yerr = _mean_std(r.get("val_ppl") for r in s["runs"])
            if math.isnan(x) or math.isnan(y):
                continue
            i = methods.index(s["method"])
            if s["sparsity"] == 0:  # a dense run: the reference every sparse point is read against
                ax.axhline(y, color="gray", linestyle="--", linewidth=1)
                ax.annotate(s["label"], (1.0, y), textcoords="offset points", xytext=(-4, 4),
                            ha="right", fontsize=8, color="gray")
            ax.errorbar(x, y, yerr=yerr, marker=MARKERS[i % len(MARKERS)], color=colors[i % len(colors)],
                        linestyle="none", capsize=3, label=s["method"])
            ax.annotate(f"{s['sparsity']:g}" + (f" ({s['extra']})" if s["extra"] else ""), (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
        ax.set_xlabel("training FLOPs ×dense")
        ax.set_ylabel("validation perplexity")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8, title="method (points: sparsity)", title_fontsize=8)
    fig.tight_layout()
    return fig


def layer_density(records: list[dict], suite_dir: Path):
    series = [s for s in _series(records) if s["runs"][0].get("layer_density")]
    if not series:
        return None
    sparsities = sorted({s["sparsity"] for s in series if s["sparsity"]}) or [0.0]
    fig, axes = plt.subplots(len(sparsities), 1, figsize=(9, 3.2 * len(sparsities)), squeeze=False)
    for ax, sparsity in zip(axes[:, 0], sparsities):
        names: list[str] = []
        for s in series:
            if s["sparsity"] not in (sparsity, 0.0) or (s["sparsity"] == 0 and len(sparsities) > 1):
                continue
            density = s["runs"][0]["layer_density"]  # the first seed's: densities are per configuration
            names = names or list(density)
            ax.plot(range(len(density)), list(density.values()), marker=".", label=s["label"])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=6)
        ax.set_ylabel("density")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"sparsity {sparsity:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _short(name: str) -> str:
    return name.replace("transformer.", "").replace("model.", "").replace(".weight", "")


def read_curve(run_dir: Path, tokens_per_step: float) -> tuple[list[float], list[float]]:
    """(tokens, val_loss) from a run's ``metrics.jsonl``."""
    tokens, losses = [], []
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return tokens, losses
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("val_loss") is not None:
            tokens.append(record.get("tokens") or record["step"] * tokens_per_step)
            losses.append(record["val_loss"])
    return tokens, losses


def curves(records: list[dict], suite_dir: Path):
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for i, s in enumerate(_series(records)):
        for j, run in enumerate(s["runs"]):
            per_step = (run.get("tokens") or 0) / max(run.get("steps") or 1, 1)
            x, y = read_curve(suite_dir / str(run.get("run_id")), per_step)
            if x:
                ax.plot(x, y, color=colors[i % len(colors)], alpha=0.8, linewidth=1.2,
                        label=f"{s['label']} s={s['sparsity']:g}" if j == 0 else None)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
