"""``sparsebench eval``: downstream evaluation of finished runs, results in each run's ``eval.json``.

- zero/few-shot tasks through lm-eval-harness (``lm_eval.simple_evaluate`` on the exported
  model; ``pip install sparsebench[eval]``);
- GLUE fine-tuning with the mask fixed (:mod:`sparsebench.glue`).

``eval.json`` maps ``lm_eval/<task>`` and ``glue/<task>`` to ``{"score": ..., "metric": ..., ...}``;
the suite's tables show every ``score`` as a column (see :func:`sparsebench.results.read_runs`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from sparsebench.errors import SparsebenchError
from sparsebench.results import EVAL_FILE, current_run_ids, write_json

EXPORT_DIR = "export"
# lm-eval metric names in order of preference (the first the task reports is the headline)
LM_EVAL_METRICS = ("acc_norm,none", "acc,none", "exact_match,none", "mcc,none", "f1,none", "word_perplexity,none")


class EvalError(SparsebenchError):
    """A downstream evaluation that cannot run (missing package, no tokenizer, no data)."""


def run_dirs(target: Path) -> list[Path]:
    """``target`` itself if it is a run's folder, else the finished runs of the suite folder."""
    target = Path(target)
    if (target / "summary.json").is_file():
        return [target]
    ids = current_run_ids(target)
    candidates = [target / i for i in ids] if ids is not None else sorted(p.parent for p in target.glob("*/summary.json"))
    finished = [d for d in candidates if _status(d) == "ok"]
    if not finished:
        raise EvalError(f"{target}: no finished run (a run's folder or a suite's results folder)")
    return finished


def _status(run_dir: Path) -> Optional[str]:
    try:
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("status")
    except (OSError, json.JSONDecodeError):
        return None


def record(run_dir: Path, results: dict[str, dict[str, Any]]) -> None:
    """Merge ``results`` into ``run_dir/eval.json`` (atomically; other tasks' results stay)."""
    path = Path(run_dir) / EVAL_FILE
    try:
        current = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        current = {}
    write_json(path, {**current, **results})


def exported(run_dir: Path) -> Path:
    """The run exported to ``run_dir/export`` (once; reused while it is newer than the run)."""
    from sparsebench.export import INFO_FILE, export_run

    out = Path(run_dir) / EXPORT_DIR
    summary = Path(run_dir) / "summary.json"
    if not ((out / INFO_FILE).is_file() and (out / INFO_FILE).stat().st_mtime >= summary.stat().st_mtime):
        export_run(run_dir, out)
    return out


# --------------------------------------------------------------------------------------------
# lm-evaluation-harness
# --------------------------------------------------------------------------------------------


def lm_eval_tasks(run_dir: Path, tasks: list[str], num_fewshot: Optional[int] = None, limit: Optional[float] = None,
                  batch_size: int = 8, device: str = "cpu", include_path: Optional[Path] = None) -> dict[str, dict[str, Any]]:
    """Evaluate the run's exported model on lm-eval ``tasks``; ``{"lm_eval/<task>": {...}}``.

    ``include_path``: a folder of extra task YAML files (lm-eval's own format, e.g. a local dataset).
    """
    try:
        import lm_eval
        extra = {}
        if include_path is not None:
            from lm_eval.tasks import TaskManager

            extra["task_manager"] = TaskManager(include_path=str(include_path))
    except ImportError:
        raise EvalError("lm-eval-harness is not installed: pip install sparsebench[eval]") from None
    model_dir = exported(run_dir)
    if not (model_dir / "tokenizer_config.json").is_file():
        raise EvalError(f"{run_dir}: the run has no tokenizer (synthetic data); lm-eval tasks need text")
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=list(tasks),
        num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device, **extra,
    )
    out = {}
    for task, metrics in (results or {}).get("results", {}).items():
        headline = next((m for m in LM_EVAL_METRICS if isinstance(metrics.get(m), (int, float))), None)
        numbers = {k.replace(",none", ""): v for k, v in metrics.items() if isinstance(v, (int, float))}
        out[f"lm_eval/{task}"] = {"score": metrics[headline] if headline else None,
                                  "metric": headline.replace(",none", "") if headline else None,
                                  "num_fewshot": num_fewshot, "limit": limit, **numbers}
    return out


# --------------------------------------------------------------------------------------------
# GLUE
# --------------------------------------------------------------------------------------------


def glue_tasks(run_dir: Path, tasks: list, glue_dir: Optional[Path], options,
               say: Callable[[str], None] = lambda line: None) -> dict[str, dict[str, Any]]:
    """Fine-tune the run's model on each GLUE task with its mask fixed; ``{"glue/<task>": {...}}``."""
    from sparsebench.glue import finetune, load_task

    from sparsebench.export import load_run

    loaded = load_run(run_dir)
    tokenizer = loaded.data.tokenizer
    if tokenizer is None:
        raise EvalError(f"{run_dir}: the run has no tokenizer (synthetic data); GLUE needs a text tokenizer")
    model_dir = exported(run_dir)
    pad_id = _pad_id(tokenizer)
    out = {}
    for task in tasks:
        train, dev = load_task(task, glue_dir)
        say(f"{Path(run_dir).name}: GLUE {task.name} ({len(train)} train, {len(dev)} dev examples)")
        out[f"glue/{task.name}"] = finetune(model_dir, loaded.masks, task, train, dev, tokenizer.encode, pad_id, options)
    return out


def _pad_id(tokenizer: Any) -> int:
    """A padding id: the tokenizer's own, else its end-of-text token, else 0 (NUL for bytes).

    Padding is masked out and the head reads the last non-padding token, so any id works.
    """
    hf = getattr(tokenizer, "hf", None)
    for candidate in (getattr(hf, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0
