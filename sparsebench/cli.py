"""The ``sparsebench`` command: run, validate, methods, report."""

from __future__ import annotations

import inspect
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
    fresh: bool = typer.Option(False, "--fresh", help="re-run runs that already have results"),
) -> None:
    """Run every run of SUITE and print the comparison table."""
    from sparsebench.runner import run_suite

    try:
        outcome = run_suite(suite, out, overrides=_parse_sets(set_), fresh=fresh, console=console)
    except SparsebenchError as exc:
        _fail(exc)
        return
    if outcome.skipped:
        console.print(f"{outcome.skipped} run(s) already had results and were skipped (--fresh re-runs them).")
    if outcome.failed:
        err_console.print(f"[bold red]{len(outcome.failed)} run(s) failed[/]; see error.log in their folders.")
        raise typer.Exit(1)


@app.command()
def validate(
    suite: Path = typer.Argument(..., help="suite YAML file"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a dotted key"),
    data: bool = typer.Option(False, "--data", help="also load and tokenise the data sources"),
) -> None:
    """Check SUITE without training: keys, methods, options, models, data files."""
    from sparsebench.plugins import load_registry
    from sparsebench.runner import prepare_data
    from sparsebench.suites import expand_suite

    try:
        suite_cfg, runs = expand_suite(suite, load_registry(), _parse_sets(set_))
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
    from sparsebench.plugins import load_registry

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
