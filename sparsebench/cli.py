"""The ``sparsebench`` command: run, validate, methods, report."""

from __future__ import annotations

import inspect
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
import yaml
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
    overrides = {}
    for item in sets or []:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects KEY=VALUE (dotted key), got '{item}'")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


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
    try:
        outcome = run_suite(suite, out, overrides=_parse_sets(set_), fresh=fresh, console=console)
    except SparsebenchError as exc:
        _fail(exc)
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
    """List every registered method: package, version, hooks and options with defaults.

    A method with a hook implementation that no specification declares is marked BROKEN
    (suites that use it are refused by validate and run)."""
    from sparsebench.hooks import describe_unknown
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
        unknown = registry.unknown_hooks(name)  # e.g. a misspelled hook: suites that use it are refused
        label = f"{name}\nBROKEN: {describe_unknown(unknown)}" if unknown else name
        table.add_row(label, entry.package, ", ".join(hooks), options or "—", style="red" if unknown else None)
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
    write_suite_tables(directory, directory.name)
    table = comparison_table(summaries)
    if fmt == "md":
        sys.stdout.write(render_markdown(table, directory.name, entropy_floor(summaries)))
    elif fmt == "csv":
        sys.stdout.write(table.to_csv(index=False))
    else:
        sys.stdout.write(render_latex(table))


if __name__ == "__main__":  # pragma: no cover
    app()
