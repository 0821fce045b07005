"""The ``sparsebench`` command: run, validate, methods, report, export, eval."""

from __future__ import annotations

import inspect
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sparsebench.errors import SparsebenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmark sparse training of transformer LMs.")
# Piped output (CI logs, `| tee`) is not wrapped at 80 columns: the table stays one row per line.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # "[wandb]" is text
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
    fresh: bool = typer.Option(False, "--fresh", help="start every run from scratch: its old results and checkpoints are removed first"),
    gpus: Optional[int] = typer.Option(
        None, "--gpus", min=1,
        help="train on N ranks through the DeepSpeed launcher (deepspeed --num_gpus N); the suite needs distributed.backend: deepspeed",
    ),
) -> None:
    """Run every run of SUITE and print the comparison table.

    Re-running the same command skips finished runs and resumes the others from their last checkpoint.
    Several processes may run one suite into one --out at once: each run is trained by one of them
    (a lock per run), the others move on to the runs nobody holds.

    Ctrl-C stops after writing a checkpoint of the current step (training.checkpoint_every sets how often).
    """
    from sparsebench.runner import DiskFull, run_suite

    if gpus is not None:
        _launch(gpus, suite, out, set_, fresh)
    before = _snapshot(out)
    try:
        _check_out_dir(out)
        outcome = run_suite(suite, out, overrides=_parse_sets(set_), fresh=fresh, console=console)
    except DiskFull as exc:  # before any run: nothing could be written
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
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
    if outcome.elsewhere:
        console.print(f"{len(outcome.elsewhere)} run(s) are running elsewhere (another process holds their lock) "
                      "and were left to it: " + ", ".join(outcome.elsewhere), highlight=False, soft_wrap=True)
    if outcome.failed:
        err_console.print(f"[bold red]{len(outcome.failed)} run(s) failed[/]; see error.log in their folders.")
    if outcome.stopped:
        err_console.print(f"[bold red]stopped:[/] {outcome.stopped}", highlight=False, soft_wrap=True)
    if outcome.failed or outcome.stopped:
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


def _print_version(value: bool) -> None:
    if value:
        import sparsebench

        console.print(f"sparsebench {sparsebench.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="print the version and exit"),
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
    fmt: str = typer.Option("md", "--format", "-f", help="md | csv | latex (csv: the numeric table.csv)"),
    all_runs: bool = typer.Option(False, "--all", help="every run on disk, not only the suite's last run (prints; writes nothing)"),
    pivot: bool = typer.Option(False, "--pivot", help="method × sparsity (× model) of --metric, as in papers"),
    metric: str = typer.Option("val_ppl", "--metric", help="the metric of --pivot (a summary.json key)"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="also write table.tex and DIR/plots/ (PNG and SVG)"),
) -> None:
    """Re-render a suite's tables (summary.csv, table.csv, table.md, table.tex) and plots/.

    The tables show the runs of the suite's last `sparsebench run` (runs.json); --all shows every
    run in the folder. A folder without runs is refused and no table is overwritten.
    """
    from sparsebench import tables
    from sparsebench.results import current_run_ids, entropy_floor, read_runs, write_suite_tables

    if fmt not in ("md", "csv", "latex"):
        _fail(SparsebenchError(f"--format: unknown format '{fmt}'. Allowed: md, csv, latex"))
    run_ids = None if all_runs else current_run_ids(directory)
    records = read_runs(directory, run_ids)
    if not records:
        _fail(SparsebenchError(_no_runs_message(directory)))
    numeric = tables.numeric_table(records)
    if not all_runs:
        try:
            write_suite_tables(directory, directory.resolve().name, final=plots)
        except (PermissionError, FileExistsError, IsADirectoryError) as exc:  # e.g. a read-only results folder
            _fail(SparsebenchError(f"cannot write the tables into {directory}: {exc.strerror or exc} ({exc.filename})"))
    if pivot:
        if f"{metric}_mean" not in numeric.columns and not any(metric in r for r in records):
            _fail(SparsebenchError(f"--metric: '{metric}' is not a summary key (e.g. val_ppl, test_ppl, train_flops_vs_dense)"))
        if f"{metric}_mean" not in numeric.columns:
            numeric = tables.numeric_table(records, metrics=[metric])
        text = tables.render_pivot(tables.pivot_table(numeric, metric))
        sys.stdout.write(f"{metric} — {directory.resolve().name}\n\n{text}")
        return
    if fmt == "md":
        sys.stdout.write(tables.render_markdown(numeric, directory.resolve().name, entropy_floor(records)))
    elif fmt == "csv":
        sys.stdout.write(numeric.to_csv(index=False))
    else:
        sys.stdout.write(tables.render_latex(numeric, caption=f"{directory.resolve().name}: mean ± std over seeds"))


def _no_runs_message(directory: Path) -> str:
    if not directory.is_dir():
        return f"{directory}: no such folder"
    suites = sorted(p.parent.parent.name for p in directory.glob("*/*/summary.json"))
    if suites:
        return f"{directory}: holds suite folders ({', '.join(dict.fromkeys(suites))}); report one of them"
    return f"{directory}: no run summaries (*/summary.json) found; is it a suite's results folder (OUT/<suite name>)?"


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a finished run's folder (OUT/<suite>/<run-id>)"),
    out: Path = typer.Argument(..., help="the folder to write (Hugging Face save_pretrained layout)"),
    check: bool = typer.Option(False, "--check", help="reload OUT with transformers and compare its validation loss with the run's"),
) -> None:
    """Write a run's final sparse model as a Hugging Face folder (model, tokenizer, masks.pt).

    Load it with transformers.AutoModelForCausalLM.from_pretrained(OUT); pruned weights are exactly zero.
    """
    from sparsebench.export import check_export, export_run

    try:
        export_run(run_dir, out)
        console.print(f"exported {run_dir} → {out}", highlight=False)
        if check:
            loaded, reported = check_export(out, run_dir)
            console.print(f"validation loss: exported {loaded:.6f}, run {reported:.6f} (difference {abs(loaded - reported):.2e})",
                          highlight=False)
            if abs(loaded - reported) > 1e-4:
                raise SparsebenchError(f"{out}: the exported model's validation loss differs from the run's")
    except SparsebenchError as exc:
        _fail(exc)


@app.command(name="eval")
def eval_(
    target: Path = typer.Argument(..., help="a finished run's folder, or a suite's results folder (its current runs)"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval-harness tasks, comma-separated (e.g. hellaswag,arc_easy)"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="lm-eval: examples in the prompt (default: the task's)"),
    limit: Optional[float] = typer.Option(None, "--limit", help="lm-eval: at most N examples per task (or a fraction)"),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="lm-eval: a folder of extra task YAML files (e.g. on local data)"),
    glue: Optional[str] = typer.Option(None, "--glue", help="GLUE tasks to fine-tune on with the mask fixed: mnli,qqp,sst2,cola,rte or all"),
    glue_dir: Optional[Path] = typer.Option(None, "--glue-dir", help="local GLUE data in GLUE's TSV layout (DIR/SST-2/train.tsv, ...); default: the Hugging Face Hub"),
    epochs: int = typer.Option(3, "--epochs", min=1, help="GLUE: fine-tuning epochs"),
    lr: float = typer.Option(1e-4, "--lr", help="GLUE: AdamW learning rate"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="GLUE fine-tuning and lm-eval batch size"),
    max_len: int = typer.Option(128, "--max-len", min=1, help="GLUE: tokens per example (truncated)"),
    max_train: Optional[int] = typer.Option(None, "--max-train", min=1, help="GLUE: only the first N training examples"),
    seed: int = typer.Option(0, "--seed", help="GLUE: seed of the head's initialisation and the data order"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
) -> None:
    """Downstream evaluation: lm-eval-harness tasks and GLUE fine-tuning with the mask fixed.

    Results go to each run's eval.json and join the suite's tables as columns (lm_eval/<task>, glue/<task>).
    """
    from sparsebench import downstream
    from sparsebench.glue import FinetuneOptions, parse_tasks
    from sparsebench.results import write_suite_tables

    if not tasks and not glue:
        _fail(SparsebenchError("eval: nothing to do; give --tasks (lm-eval-harness) and/or --glue (GLUE fine-tuning)"))
    try:
        import torch

        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        glue_list = parse_tasks(glue) if glue else []
        options = FinetuneOptions(epochs=epochs, lr=lr, batch_size=batch_size, max_len=max_len,
                                  max_train=max_train, seed=seed, device=dev)
        for run_dir in downstream.run_dirs(target):
            results = {}
            if tasks:
                names = [t.strip() for t in tasks.split(",") if t.strip()]
                results.update(downstream.lm_eval_tasks(run_dir, names, num_fewshot, limit, batch_size, dev, include_path))
            if glue_list:
                results.update(downstream.glue_tasks(run_dir, glue_list, glue_dir, options,
                                                     say=lambda line: console.print(line, highlight=False)))
            downstream.record(run_dir, results)
            for key, value in results.items():
                console.print(f"{run_dir.name}  {key}: {value.get('metric')} {value.get('score')}", highlight=False)
        suite_dir = target if not (target / "summary.json").is_file() else target.parent
        write_suite_tables(suite_dir, suite_dir.resolve().name, final=True)
    except SparsebenchError as exc:
        _fail(exc)


if __name__ == "__main__":  # pragma: no cover
    app()
