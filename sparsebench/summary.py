"""The figures of one finished run (``summary.json``)."""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping

from sparsebench.config import RunConfig
from sparsebench.context import perplexity
from sparsebench.flops import forward_flops
from sparsebench.loop import LoopResult
from sparsebench.masks import mask_stats, parameter_densities
from sparsebench.results import versions
from sparsebench.run_setup import Setup


def _model_name(model: Any) -> str:
    from sparsebench.suite_checks import model_label  # a mapping is named by its shape, e.g. gpt2-2L-4H-128d

    return model_label(model)


#: a logical layer with more than this share of its rows (or columns) dead gets a warning
DEAD_UNITS_WARN_FRACTION = 0.5
#: |sparsity_actual − sparsity_target| above this (absolute) gets a warning
SPARSITY_WARN_GAP = 0.01


def collapse_warnings(stats: Mapping[str, Any], target: float, check_target: bool) -> list[str]:
    """Warnings about collapsed layers, one line each (``summary.json``'s ``warnings``).

    * a logical layer at density 0 (every weight pruned);
    * a logical layer with more than :data:`DEAD_UNITS_WARN_FRACTION` of its rows (output units)
      or columns (input units) dead — a few dead units are normal at high sparsity, half of
      them means the layer has collapsed;
    * the actual sparsity more than :data:`SPARSITY_WARN_GAP` (absolute) off the target, unless
      ``check_target`` is False (methods that ignore the suite's sparsity, e.g. ``dense``).
    """
    warnings = []
    for name, density in stats["layer_density"].items():
        if density == 0.0:
            warnings.append(f"{name}: density 0 (every weight pruned)")
            continue
        for kind, dead, total in (("rows", stats["dead_rows_by_layer"][name], stats["rows_by_layer"][name]),
                                  ("columns", stats["dead_cols_by_layer"][name], stats["cols_by_layer"][name])):
            if total and dead / total > DEAD_UNITS_WARN_FRACTION:
                warnings.append(f"{name}: {dead} of {total} {kind} dead ({dead / total:.0%}; density {density:.3f})")
    gap = stats["sparsity_actual"] - target
    if check_target and abs(gap) > SPARSITY_WARN_GAP:
        warnings.append(f"sparsity {stats['sparsity_actual']:.4f} is {abs(gap):.4f} "
                        f"{'above' if gap > 0 else 'below'} the target {target:g}")
    return warnings


def build_summary(setup: Setup, result: LoopResult) -> dict[str, Any]:
    run = setup.run
    cfg: RunConfig = run.config
    stats = mask_stats(run.masks, result.initial_masks, run.layers)
    densities = stats["layer_density"]  # per logical layer (c_attn's [q], [k], [v])
    n_params = sum(p.numel() for p in run.model.parameters())
    n_sparsifiable = sum(p.numel() for p in run.sparsifiable.values())
    n_pruned = sum(int((~m).sum()) for m in run.masks.values())
    # FLOPs per parameter: a fused weight is one matmul at its whole-tensor density
    inference = forward_flops(run.model, cfg.data.seq_len, parameter_densities(run.masks))
    method = run.plugins.get(cfg.method.name)
    warnings = collapse_warnings(stats, cfg.sparsity, not getattr(method, "ignores_sparsity", False))
    for line in warnings:  # also in summary.json and flagged in the table
        print(f"warning: {cfg.run_id}: {line}", file=sys.stderr)
    method_time = setup.timer.total
    floor = run.data.entropy_rate
    summary: dict[str, Any] = {
        "suite": cfg.suite,
        "run_id": cfg.run_id,
        "method": cfg.method.name,
        "label": cfg.method.display,
        "method_config": cfg.method.config,
        "components": {w.name: w.config for w in cfg.method.with_},
        "model": _model_name(cfg.model),
        "n_params": n_params,
        "n_sparsifiable": n_sparsifiable,
        "sparsity_target": cfg.sparsity,
        "sparsity_actual": stats["sparsity_actual"],
        "sparsity_model": n_pruned / n_params,
        "layer_density": densities,
        "turnover": stats["turnover"],
        "dead_rows": stats["dead_rows"],
        "dead_cols": stats["dead_cols"],
        "warnings": warnings,
        "seed": cfg.seed,
        "steps": run.step,
        "tokens": run.step * run.tokens_per_step,
        "val_loss": result.val_loss,
        "val_ppl": perplexity(result.val_loss),
        "test_loss": result.test_loss,
        "test_ppl": perplexity(result.test_loss),
        "entropy_floor_ppl": math.exp(floor) if floor is not None else None,
        "train_flops": run.ledger.total,
        "train_flops_vs_dense": run.ledger.total / run.ledger.dense_total,
        "flops_by_name": dict(run.ledger.by_name),
        "inference_flops": inference.total,
        "inference_flops_vs_dense": inference.total / inference.dense_total,
        "wall_time_s": result.timings.total_s,
        "train_time_s": result.timings.step_s,
        "eval_time_s": result.timings.eval_s,
        "method_time_s": method_time,
        "method_time_by_plugin": dict(setup.timer.seconds),
        "overhead_frac": method_time / result.timings.step_s if result.timings.step_s else 0.0,
        "upkeep_frac": result.timings.upkeep_s / result.timings.step_s if result.timings.step_s else 0.0,
        "tokens_per_s": run.step * run.tokens_per_step / result.timings.step_s if result.timings.step_s else 0.0,
        "peak_memory_bytes": result.peak_memory_bytes,
        "device": str(run.device),
        "status": "ok",
        "error": None,
        "versions": versions(),
    }
    summary.update(setup.hooks.on_run_end(run=run, summary=summary))
    return summary


def failed_summary(cfg: RunConfig, error: str) -> dict[str, Any]:
    """A failed run keeps its place in the table, with the one-line reason."""
    return {
        "suite": cfg.suite, "run_id": cfg.run_id, "method": cfg.method.name, "label": cfg.method.display,
        "method_config": cfg.method.config, "model": _model_name(cfg.model), "sparsity_target": cfg.sparsity,
        "seed": cfg.seed, "status": "failed", "error": error, "versions": versions(),
    }
