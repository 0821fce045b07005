"""The figures of one finished run (``summary.json``)."""

from __future__ import annotations

import math
from typing import Any

from sparsebench.config import RunConfig
from sparsebench.context import perplexity
from sparsebench.flops import forward_flops
from sparsebench.loop import LoopResult
from sparsebench.masks import mask_stats
from sparsebench.results import versions
from sparsebench.run_setup import Setup


def _model_name(model: Any) -> str:
    from sparsebench.suite_checks import model_label  # a mapping is named by its shape, e.g. gpt2-2L-4H-128d

    return model_label(model)


def build_summary(setup: Setup, result: LoopResult) -> dict[str, Any]:
    run = setup.run
    cfg: RunConfig = run.config
    stats = mask_stats(run.masks, result.initial_masks, run.layers)
    densities = stats["layer_density"]
    n_params = sum(p.numel() for p in run.model.parameters())
    n_sparsifiable = sum(p.numel() for p in run.sparsifiable.values())
    n_pruned = sum(int((~m).sum()) for m in run.masks.values())
    inference = forward_flops(run.model, cfg.data.seq_len, densities)
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
