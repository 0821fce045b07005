"""The ``sparsebench`` command: run, validate, methods, report."""

from __future__ import annotations

import inspect
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from sparsebench.errors import SparsebenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmark sparse training of transformer LMs.")
# Piped output (CI logs, `| tee`) is not wrapped at 80 columns: the table stays one row per line.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _parse_sets(sets: Optional[List[str]]) -> dict:
    """``--set KEY=VALUE`` items → dotted key → value (safe YAML; malformed values are SuiteErrors)."""
    from sparsebench.yaml_loading import parse_set_value

    return dict(parse_set_value(item) for item in sets or [])


def _check_out_dir(out: Path, option: str = "--out") -> None:
    """``out`` must be (or be creatable as) a writable folder: refuse a file or a read-only place."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise SparsebenchError(f"{option}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise SparsebenchError(f"{option}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SparsebenchError(f"{option}: cannot write into {existing} (permission denied)")


def _remove_empty_new_dirs(out: Path, before: set) -> None:
    """After a refusal: remove the folders this call created under ``out`` if they stayed empty."""
    candidates = [p for p in (out.iterdir() if out.is_dir() else []) if p not in before and p.is_dir()]
    for path in [*candidates, *([out] if out not in before else [])]:
        try:
            path.rmdir()  # only ever succeeds on an empty folder
        except OSError:
            pass


def _snapshot(out: Path) -> set:
    if not out.is_dir():
        return set()
    return {out, *out.iterdir()}


@app.command()
def run(
    suite: Path = typer.Argument(..., help="suite YAML file"),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="results folder; the suite writes to OUT/<suite name>/"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a dotted key, e.g. --set training.steps=50"),
    fresh: bool = typer.Option(False, "--fresh", help="start every run from scratch, ignoring results and checkpoints already there"),
    gpus: Optional[int] = typer.Option(
        None, "--gpus", min=1,
        help="train on N ranks through the DeepSpeed launcher (deepspeed --num_gpus N); the suite needs distributed.backend: deepspeed",
    ),
) -> None:
    """Run every run of SUITE and print the comparison table.

    Re-running the same command skips finished runs and resumes the others from their last checkpoint.

    Ctrl-C stops after writing a checkpoint of the current step (training.checkpoint_every sets how often).
    """
    from sparsebench.runner import run_suite

    if gpus is not None:
        _launch(gpus, suite, out, set_, fresh)
    before = _snapshot(out)
    try:
        _check_out_dir(out)
        outcome = run_suite(suite, out, overrides=_parse_sets(set_), fresh=fresh, console=console)
    except SparsebenchError as exc:
        _remove_empty_new_dirs(out, before)  # a refused suite leaves no empty OUT/<suite>/ behind
        _fail(exc)
        return
    except (PermissionError, NotADirectoryError, FileExistsError) as exc:  # e.g. a read-only OUT/<suite>/
        _fail(SparsebenchError(f"cannot write results under {out}: {exc.strerror or exc} ({exc.filename})"))
        return
    except KeyboardInterrupt as exc:
        _interrupted(exc, suite, out, set_)
    if outcome.skipped:
        console.print(f"{outcome.skipped} run(s) already had results and were skipped (--fresh re-runs them).")
    if outcome.failed:
        err_console.print(f"[bold red]{len(outcome.failed)} run(s) failed[/]; see error.log in their folders.")
        raise typer.Exit(1)


def _launch(gpus: int, suite: Path, out: Path, sets: Optional[List[str]], fresh: bool) -> None:
    """Re-run this command on ``gpus`` ranks under the DeepSpeed launcher; exit with its status."""
    import subprocess

    from sparsebench.engines.collectives import launcher_command
    from sparsebench.engines.deepspeed_config import check_runs
    from sparsebench.registry import load_registry
    from sparsebench.suites import expand_suite

    try:
        suite_cfg, runs = expand_suite(suite, load_registry(), _parse_sets(sets))
        check_runs(runs)
        if suite_cfg.distributed.backend != "deepspeed":
            raise SparsebenchError(
                f"--gpus: suite '{suite_cfg.name}' has distributed.backend '{suite_cfg.distributed.backend}'; "
                "set distributed: {backend: deepspeed} (or --set distributed.backend=deepspeed)"
            )
        args = ["run", str(suite), "--out", str(out), *[a for s in sets or [] for a in ("--set", s)]]
        command = launcher_command(gpus, args + (["--fresh"] if fresh else []))
    except SparsebenchError as exc:
        _fail(exc)
        return
    raise typer.Exit(subprocess.call(command))


@app.callback()
def main(
    local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Benchmark sparse training of transformer LMs."""
    # The DeepSpeed launcher passes --local_rank=N before the command; LOCAL_RANK says the same.


def _interrupted(exc: KeyboardInterrupt, suite: Path, out: Path, sets: Optional[List[str]]) -> None:
    """Ctrl-C: say where the run stopped and the exact command that resumes it; exit 130."""
    from sparsebench.interrupts import RunInterrupted

    if isinstance(exc, RunInterrupted):
        where = f" after step {exc.step} of run {exc.run_id}" + (f"; checkpoint {exc.checkpoint}" if exc.checkpoint else "")
    else:
        where = " (runs with a checkpoint resume from it)"
    command = ["sparsebench", "run", str(suite), "--out", str(out)]
    for item in sets or []:
        command += ["--set", item]
    err_console.print(f"interrupted{where}.", highlight=False, soft_wrap=True)
    err_console.print(f"resume with: {shlex.join(command)}", highlight=False, soft_wrap=True)
    raise typer.Exit(130)


@app.command()
def validate(
    suite: Path = typer.Argument(..., help="suite YAML file"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a dotted key"),
    data: bool = typer.Option(False, "--data", help="also load and tokenise the data sources"),
) -> None:
    """Check SUITE without training: keys, methods, options, models, data files."""
    from sparsebench.registry import load_registry
    from sparsebench.engines.deepspeed_config import check_runs
    from sparsebench.runner import prepare_data
    from sparsebench.suites import expand_suite

    try:
        suite_cfg, runs = expand_suite(suite, load_registry(), _parse_sets(set_))
        check_runs(runs)  # distributed: the DeepSpeed config
        if data:
            prepare_data(runs, console)
    except SparsebenchError as exc:
        _fail(exc)
        return
    console.print(f"[green]ok[/]: suite '{suite_cfg.name}' expands to {len(runs)} runs")
    for cfg in runs:
        console.print(f"  {cfg.run_id}", highlight=False)


@app.command()
def methods() -> None:
    """List every registered method: package, version, hooks and options with defaults."""
    from sparsebench.registry import load_registry

    try:
        registry = load_registry()
    except SparsebenchError as exc:
        _fail(exc)
        return
    table = Table(title="sparsebench methods")
    for col in ("method", "package", "hooks", "options (defaults)"):
        table.add_column(col, overflow="fold")
    for name in registry.names():
        entry = registry.entries[name]
        hooks = sorted(n for n, f in inspect.getmembers(entry.cls) if hasattr(f, "sparsebench_impl"))
        options = ", ".join(f"{k}={v!r}" for k, v in entry.cls.Config().model_dump().items())
        table.add_row(name, entry.package, ", ".join(hooks), options or "—")
    console.print(table)


@app.command()
def report(
    directory: Path = typer.Argument(..., help="a suite's results folder (OUT/<suite name>)"),
    fmt: str = typer.Option("md", "--format", "-f", help="md | csv | latex"),
) -> None:
    """Re-render the comparison table from the runs' summary.json files."""
    from sparsebench.results import comparison_table, entropy_floor, read_summaries, render_latex, render_markdown, write_suite_tables

    if fmt not in ("md", "csv", "latex"):
        _fail(SparsebenchError(f"--format: unknown format '{fmt}'. Allowed: md, csv, latex"))
    summaries = read_summaries(directory)
    if not summaries:
        _fail(SparsebenchError(f"{directory}: no */summary.json found (is it a suite's results folder?)"))
    try:
        write_suite_tables(directory, directory.name)
    except (PermissionError, FileExistsError, IsADirectoryError) as exc:  # e.g. a read-only results folder
        _fail(SparsebenchError(f"cannot write the tables into {directory}: {exc.strerror or exc} ({exc.filename})"))
    table = comparison_table(summaries)
    if fmt == "md":
        sys.stdout.write(render_markdown(table, directory.name, entropy_floor(summaries)))
    elif fmt == "csv":
        sys.stdout.write(table.to_csv(index=False))
    else:
        sys.stdout.write(render_latex(table))


if __name__ == "__main__":  # pragma: no cover
    app()
