"""Running a suite: every run in turn, results written as they finish, failures isolated.

Processes that share a suite's folder share its runs: each run is trained by the process that
holds its lock (:mod:`sparsebench.run_lock`); the others move on. A full disk stops the suite
(every later run would fail the same way); any other failure fails its run only.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from rich.console import Console
from rich.table import Table

from sparsebench.atomic import atomic_write_via, is_disk_full, remove_stale_temporaries, retire
from sparsebench.checkpoints.files import list_checkpoints, remove_checkpoint
from sparsebench.config import RunConfig
from sparsebench.data import load_token_splits
from sparsebench.engines import make_checkpointer
from sparsebench.engines.collectives import all_reduce_mean, broadcast_object, is_initialized, is_rank0, rank, rank0_first
from sparsebench.engines.deepspeed_config import join_if_needed, resolve_run_config, uses_deepspeed
from sparsebench.errors import SparsebenchError
from sparsebench.failures import DiskFull, failure_reason, one_line, write_error_log
from sparsebench.interrupts import InterruptGuard
from sparsebench.loop import train
from sparsebench.progress import RunProgress, make_progress
from sparsebench.registry import Registry, load_registry
from sparsebench.results import (
    comparison_table, entropy_floor, read_summaries, write_json, write_run_config, write_suite_tables,
)
from sparsebench.run_lock import RunLock, suite_lock
from sparsebench.run_setup import setup_run
from sparsebench.suites import SuiteConfig, expand_suite
from sparsebench.tables import display_table
from sparsebench.summary import build_summary, failed_summary

__all__ = ["DiskFull", "SuiteOutcome", "execute_run", "one_line", "prepare_data", "run_suite"]


@dataclass
class SuiteOutcome:
    suite: SuiteConfig
    suite_dir: Path
    summaries: list[dict] = field(default_factory=list)
    #: runs that already had results (or that another process finished meanwhile)
    skipped: int = 0
    #: runs another process was still training when this one finished (not failures)
    elsewhere: list[str] = field(default_factory=list)
    #: why the suite stopped before its end (a full disk), else ``None``
    stopped: Optional[str] = None
    #: the runs of the suite as it is now: its tables show these and no older results
    run_ids: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [s for s in self.summaries if s.get("status") != "ok"]


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
    ``False`` first moves the whole folder aside in one rename and deletes it, so that an
    interrupted fresh start never leaves old results beside new checkpoints. Ctrl-C stops at
    the end of a step, after a checkpoint, with :class:`~sparsebench.interrupts.RunInterrupted`.
    ``SystemExit`` raised by a plugin fails the run (naming plugin and hook), not the process.
    A full disk fails the run and raises :class:`~sparsebench.failures.DiskFull` (after writing
    the failed summary if the disk still takes it). ``notify`` gets the resume decisions.

    Under a multi-rank launch every rank calls this: rank 0 writes the run's files; the other
    ranks train alongside it (a run of the local engine is trained by rank 0 alone), write
    nothing but ``error-rank<r>.log`` when they fail, and return an unwritten summary.
    """
    cfg = resolve_run_config(cfg)  # a multi-rank engine: the batch split and clipping it really trains with
    writer = is_rank0()
    if not writer and not uses_deepspeed(cfg):
        return {"status": "ok", "note": "trained by rank 0 alone"}
    error_log = run_dir / ("error.log" if writer else f"error-rank{rank()}.log")
    setup, disk_full = None, False
    try:
        if writer:
            if not resume:
                retire(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_run_config(run_dir / "config.yaml", cfg.model_dump(mode="json", by_alias=True))
        setup = setup_run(cfg, registry, run_dir if writer else None, observers if writer else ())
        with InterruptGuard() as interrupt:
            result = train(setup, checkpoints=make_checkpointer(setup, run_dir, resume, notify, interrupt))
        summary = build_summary(setup, result)
        if writer:
            masks = {n: m.cpu() for n, m in setup.run.masks.items()}
            atomic_write_via(run_dir / "masks.pt", lambda tmp: torch.save(masks, tmp))
        error_log.unlink(missing_ok=True)  # from an earlier, failed attempt
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as exc:  # a plugin's sys.exit ends its run, not the suite
        disk_full = is_disk_full(exc)
        summary = failed_summary(cfg, failure_reason(exc, setup))
        write_error_log(error_log, exc)
    finally:
        if setup is not None:
            setup.run.metrics.close()
    written = True
    if writer:
        try:
            write_json(run_dir / "summary.json", summary)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            disk_full, written = True, False
            if summary.get("status") == "ok":
                summary = failed_summary(cfg, f"disk full: summary.json could not be written ({one_line(exc)})")
    if disk_full:
        raise DiskFull(f"run {cfg.run_id} failed: {summary.get('error')}", summary, written)
    if writer and summary.get("status") == "ok" and cfg.training.keep_checkpoints == 0:
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
    """Train every run of the suite at ``path`` that is not finished and that no other process holds.

    Finished runs are skipped (``fresh``: re-trained, unless another process re-trained them
    since this one started). A run whose lock another process holds is left to it; after the
    last run those are looked at once more (finished by now, or freed by a process that died).
    """
    console = console or Console()
    registry = registry or load_registry()
    suite, runs = expand_suite(path, registry, overrides)
    suite_dir = Path(out) / suite.name
    join_if_needed(runs)  # under a DeepSpeed launch: every rank runs this function in step
    if not is_rank0():
        console = Console(quiet=True)
    with rank0_first():  # tokenises into the shared cache once; a refused data source writes nothing
        prepare_data(runs, console)
    try:
        suite_dir.mkdir(parents=True, exist_ok=True)
        if is_rank0():  # rank 0 alone writes tables, so only its own leftovers can be stale
            with suite_lock(suite_dir):  # never a temporary that another process is about to rename
                remove_stale_temporaries(suite_dir)  # a table a killed writer never renamed into place
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFull(f"disk full: cannot write to {suite_dir} ({one_line(exc)})", {}, False) from None
        raise SparsebenchError(f"--out: cannot write to {suite_dir}: {exc.strerror or exc}") from None
    outcome = SuiteOutcome(suite, suite_dir, run_ids=[cfg.run_id for cfg in runs])
    console.print(f"[bold]{suite.name}[/]: {len(runs)} runs → {suite_dir}")
    seen = {cfg.run_id: _stamp(suite_dir / cfg.run_id) for cfg in runs} if fresh and is_rank0() else {}

    with make_progress(console) as progress:
        suite_task = progress.add_task(f"suite {suite.name}", total=len(runs), info="")
        pending, announced = list(runs), set()
        try:
            for _ in range(2):  # the second pass: the runs other processes held
                pending = [cfg for cfg in pending
                           if not _run_one(cfg, registry, outcome, progress, suite_task, fresh, seen, announced)]
                if not pending:
                    break
        except DiskFull as exc:
            outcome.stopped = _disk_full_message(exc)
            pending = []
        except OSError as exc:  # a lock or a table that the full disk refused
            if not is_disk_full(exc):
                raise
            outcome.stopped = f"disk full: {one_line(exc)}; stopped the suite (later runs would fail too)"
            pending = []
        outcome.elsewhere = [cfg.run_id for cfg in pending]
    if is_rank0():
        table = _final_table(outcome)
        print_table(console, table, suite.name, entropy_floor(read_summaries(suite_dir, outcome.run_ids)))
    return outcome


def _run_one(cfg: RunConfig, registry: Registry, outcome: SuiteOutcome, progress, suite_task, fresh: bool,
             seen: dict, announced: set) -> bool:
    """Skip, train or leave one run; ``False`` when another process holds it."""
    suite_dir = outcome.suite_dir
    run_dir = suite_dir / cfg.run_id
    lock = RunLock(suite_dir, cfg.run_id)
    kind, done = broadcast_object(_claim(run_dir, lock, fresh, seen) if is_rank0() else None)  # rank 0 decides
    if kind == "error":  # every rank raises rank 0's error (a full disk refusing the lock file)
        raise done
    if kind == "done":
        outcome.summaries.append(done)
        outcome.skipped += 1
        progress.advance(suite_task)
        return True
    if kind == "elsewhere":
        if cfg.run_id not in announced:
            announced.add(cfg.run_id)
            progress.console.print(f"{cfg.run_id}: running elsewhere (another process holds {lock.path}); moving on",
                                   highlight=False)
        return False
    progress.update(suite_task, info=cfg.run_id)
    observer = RunProgress(progress, f"{cfg.method.display} s={cfg.sparsity:g} seed={cfg.seed}")
    full: Optional[DiskFull] = None
    try:
        summary = execute_run(cfg, registry, run_dir, [("progress", observer)], resume=not fresh,
                              notify=lambda line: progress.console.print(line, highlight=False))
    except DiskFull as exc:
        summary, full = exc.summary, exc
    finally:
        observer.close()
        lock.release()
    outcome.summaries.append(summary)
    if _any_rank(full is not None):  # every rank stops together
        raise full or DiskFull(f"run {cfg.run_id} failed: disk full on another rank", summary, True)
    if is_rank0():
        _write_tables(outcome)  # after every run: a kill never loses finished ones
    progress.advance(suite_task)
    return True


def _claim(run_dir: Path, lock: RunLock, fresh: bool, seen: dict) -> tuple[str, Any]:
    """Rank 0's decision on a run: ("done", its summary), ("elsewhere", None), ("train", None), or
    ("error", the OSError that refused the lock file).

    The summary is read again once the lock is held: another process may have finished the run
    between the first look and the lock.
    """
    done = _finished_summary(run_dir, fresh, seen)
    if done is not None:
        return "done", done
    try:
        if not lock.acquire():
            return "elsewhere", None
    except OSError as exc:
        return "error", exc
    done = _finished_summary(run_dir, fresh, seen)
    if done is not None:
        lock.release()
        return "done", done
    return "train", None


def _stamp(run_dir: Path) -> Optional[tuple[int, int]]:
    """Which summary.json is there (inode, modification time), to tell a new one from the old."""
    try:
        st = os.stat(run_dir / "summary.json")
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _finished_summary(run_dir: Path, fresh: bool = False, seen: Optional[dict] = None) -> Optional[dict]:
    """A run whose summary exists with status ok is done (the run id carries the config hash).

    ``fresh``: only a summary written since this process started counts (another process's).
    """
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    if fresh and _stamp(run_dir) == (seen or {}).get(run_dir.name):
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) and summary.get("status") == "ok" else None


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (itself without a process group)."""
    if not is_initialized():
        return flag
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return all_reduce_mean([float(flag)], device)[0] > 0


def _write_tables(outcome: SuiteOutcome, final: bool = False):
    with suite_lock(outcome.suite_dir):  # one writer at a time: each rewrite reads every summary there
        return write_suite_tables(outcome.suite_dir, outcome.suite.name, outcome.run_ids, final=final)


def _final_table(outcome: SuiteOutcome):
    """The suite's table as written; from memory where the full disk refused to write it."""
    try:
        return _write_tables(outcome, final=True)  # table.tex and plots/ too, once
    except OSError as exc:
        if not is_disk_full(exc):
            raise
    summaries = {s.get("run_id"): s for s in read_summaries(outcome.suite_dir, outcome.run_ids)}
    summaries.update({s.get("run_id"): s for s in outcome.summaries})
    return display_table(comparison_table(list(summaries.values())))


def _disk_full_message(exc: DiskFull) -> str:
    lines = [f"{exc}. Stopped the suite: later runs would fail too. Free some space and run the same command "
             "again: finished runs are kept, this one resumes from its last checkpoint."]
    if not exc.written:
        lines.append(f"Its summary.json could not be written: status failed, error: {exc.summary.get('error')}")
    return "\n".join(lines)


def print_table(console: Console, table, title: str, floor: Optional[float]) -> None:
    rich_table = Table(title=title + (f" — synthetic floor exp(H) = {floor:.3f}" if floor else ""))
    for col in table.columns:
        rich_table.add_column(str(col), no_wrap=col in ("method", "model"), overflow="fold")
    for _, row in table.iterrows():
        style = "red" if str(row.get("status", "ok")) != "ok" else None
        rich_table.add_row(*[str(v) for v in row.values], style=style)
    console.print(rich_table)
