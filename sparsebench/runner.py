"""Running a suite: every run in turn, results written as they finish, failures isolated."""

from __future__ import annotations

import json
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from rich.console import Console
from rich.table import Table

from sparsebench.checkpoint import InterruptGuard, list_checkpoints, remove_checkpoint
from sparsebench.config import RunConfig
from sparsebench.data import load_token_splits
from sparsebench.distributed import broadcast_object, follow_run, is_rank0, join_if_needed, rank0_first, resolve_run_config
from sparsebench.distributed_checkpoints import make_checkpointer
from sparsebench.loop import train
from sparsebench.registry import Registry, load_registry
from sparsebench.progress import RunProgress, make_progress
from sparsebench.results import (
    atomic_write_bytes_via,
    entropy_floor,
    read_summaries,
    remove_stale_temporaries,
    write_json,
    write_run_config,
    write_suite_tables,
)
from sparsebench.run_setup import setup_run
from sparsebench.suites import SuiteConfig, expand_suite
from sparsebench.summary import build_summary, failed_summary


@dataclass
class SuiteOutcome:
    suite: SuiteConfig
    suite_dir: Path
    summaries: list[dict] = field(default_factory=list)
    skipped: int = 0

    @property
    def failed(self) -> list[dict]:
        return [s for s in self.summaries if s.get("status") != "ok"]


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def execute_run(
    cfg: RunConfig,
    registry: Registry,
    run_dir: Path,
    observers: list = (),
    resume: bool = True,
    notify: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Train one run into ``run_dir``; any exception becomes a ``failed`` summary.

    ``resume``: continue from the newest usable checkpoint in ``run_dir`` (else start fresh);
    ``False`` discards checkpoints there. Ctrl-C stops at the end of a step, after a checkpoint,
    with :class:`~sparsebench.checkpoint.RunInterrupted`. ``notify`` gets the resume decisions.
    """
    cfg = resolve_run_config(cfg)  # DeepSpeed: the batch split and clipping it really trains with
    if not is_rank0():
        return follow_run(cfg, registry, run_dir, resume)  # other ranks train alongside and write nothing
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run_dir / "config.yaml", cfg.model_dump(mode="json", by_alias=True))
    if not resume:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a resumed run truncates it to its checkpoint
    setup = None
    try:
        setup = setup_run(cfg, registry, run_dir, observers)
        with InterruptGuard() as interrupt:
            result = train(setup, checkpoints=make_checkpointer(setup, run_dir, resume, notify, interrupt))
        summary = build_summary(setup, result)
        masks = {n: m.cpu() for n, m in setup.run.masks.items()}
        atomic_write_bytes_via(run_dir / "masks.pt", lambda tmp: torch.save(masks, tmp))
        (run_dir / "error.log").unlink(missing_ok=True)  # from an earlier, failed attempt
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        (run_dir / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
        summary = failed_summary(cfg, one_line(exc))
    finally:
        if setup is not None:
            setup.run.metrics.close()
    write_json(run_dir / "summary.json", summary)
    if summary["status"] == "ok" and cfg.training.keep_checkpoints == 0:
        discard_checkpoints(run_dir)  # after the summary: a kill in between never loses the run
    return summary


def discard_checkpoints(run_dir: Path) -> None:
    """Delete every checkpoint of a finished run (``training.keep_checkpoints: 0``), DeepSpeed's too."""
    for _, path in list_checkpoints(run_dir):
        remove_checkpoint(path)
    shutil.rmtree(run_dir / "deepspeed", ignore_errors=True)


def prepare_data(runs: list[RunConfig], console: Console) -> None:
    """Tokenise every distinct data source once, before any training (and fail early)."""
    seen = set()
    for cfg in runs:
        key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
        if key not in seen:
            seen.add(key)
            with console.status(f"preparing data: {cfg.data.dataset} / {cfg.data.tokenizer}"):
                load_token_splits(cfg.data)


def run_suite(
    path: Path,
    out: Path = Path("results"),
    registry: Optional[Registry] = None,
    overrides: Optional[dict[str, Any]] = None,
    fresh: bool = False,
    console: Optional[Console] = None,
) -> SuiteOutcome:
    console = console or Console()
    registry = registry or load_registry()
    suite, runs = expand_suite(path, registry, overrides)
    suite_dir = Path(out) / suite.name
    join_if_needed(runs)  # under a DeepSpeed launch: every rank runs this function in step
    if not is_rank0():
        console = Console(quiet=True)
    suite_dir.mkdir(parents=True, exist_ok=True)
    if is_rank0():  # rank 0 alone writes tables, so only its own leftovers can be stale
        remove_stale_temporaries(suite_dir)  # a table a killed writer never renamed into place
    with rank0_first():  # tokenises into the shared cache once
        prepare_data(runs, console)
    outcome = SuiteOutcome(suite, suite_dir)
    run_ids = [cfg.run_id for cfg in runs]  # the tables show the suite as it is now
    console.print(f"[bold]{suite.name}[/]: {len(runs)} runs → {suite_dir}")

    with make_progress(console) as progress:
        suite_task = progress.add_task(f"suite {suite.name}", total=len(runs), info="")
        for cfg in runs:
            run_dir = suite_dir / cfg.run_id
            done = broadcast_object(_finished_summary(run_dir))  # rank 0 decides for every rank
            if done is not None and not fresh:
                outcome.summaries.append(done)
                outcome.skipped += 1
                progress.advance(suite_task)
                continue
            progress.update(suite_task, info=cfg.run_id)
            observer = RunProgress(progress, f"{cfg.method.display} s={cfg.sparsity:g} seed={cfg.seed}")
            try:
                summary = execute_run(cfg, registry, run_dir, [("progress", observer)], resume=not fresh,
                                      notify=lambda line: progress.console.print(line, highlight=False))
            finally:
                observer.close()
            outcome.summaries.append(summary)
            if is_rank0():
                write_suite_tables(suite_dir, suite.name, run_ids)  # after every run: a kill never loses finished ones
            progress.advance(suite_task)
    if is_rank0():
        table = write_suite_tables(suite_dir, suite.name, run_ids, final=True)
        print_table(console, table, suite.name, entropy_floor(read_summaries(suite_dir, run_ids)))
    return outcome


def _finished_summary(run_dir: Path) -> Optional[dict]:
    """A run whose summary exists with status ok is done (the run id carries the config hash)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return summary if summary.get("status") == "ok" else None


def print_table(console: Console, table, title: str, floor: Optional[float]) -> None:
    rich_table = Table(title=title + (f" — synthetic floor exp(H) = {floor:.3f}" if floor else ""))
    for col in table.columns:
        rich_table.add_column(str(col), no_wrap=col in ("method", "model"), overflow="fold")
    for _, row in table.iterrows():
        style = "red" if str(row.get("status", "ok")) != "ok" else None
        rich_table.add_row(*[str(v) for v in row.values], style=style)
    console.print(rich_table)
