"""results.md, loggers.md and the commands: their files, columns, options and tasks are the code's."""

from __future__ import annotations

import importlib.util
import re

import yaml
from rich.console import Console

from tests.docs.markdown import DOCS, README, ROOT, code_blocks, section, table_rows, text
from tests.docs.test_manual import _option_rows, _same_default
from tests.helpers import run_configs

RESULTS = text(DOCS / "results.md")
LOGGERS = text(DOCS / "loggers.md")


def _logger_sections() -> dict[str, str]:
    return dict(re.findall(r"^## `(\w+)`\n(.*?)(?=^## |\Z)", LOGGERS, flags=re.S | re.M))


def test_loggers_page_has_a_section_for_exactly_the_observer_plugins(registry):
    observers = {n for n in registry.names() if getattr(registry.get(n), "observer", False)}
    assert set(_logger_sections()) == observers


def test_every_option_of_a_logger_has_a_row_with_its_real_default(registry):
    for name, body in _logger_sections().items():
        defaults = registry.get(name).Config().model_dump(mode="json")
        rows = _option_rows(body, defaults)
        assert {option for option, _ in rows} == set(defaults), f"{name}: options without a row"
        for option, shown in rows:
            assert _same_default(defaults[option], shown), (name, option, defaults[option], shown)


def test_loggers_example_validates_with_the_documented_plugins(write_suite, registry):
    block = next(b for b in code_blocks(LOGGERS, "yaml") if "plugins:" in b)
    plugins = yaml.safe_load(block)["plugins"]
    if importlib.util.find_spec("wandb") is None:  # its option validator needs the package
        plugins = [p for p in plugins if not (isinstance(p, dict) and "wandb" in p)]
    runs = run_configs(write_suite(plugins=plugins), registry)
    assert runs and all(len(cfg.plugins) == len(plugins) for cfg in runs)


def test_glue_table_lists_every_task_with_its_folder_file_and_metric():
    from sparsebench.glue import TASKS

    rows = table_rows(section(RESULTS, "glue-tasks"))
    documented = {row[0].strip("`"): tuple(cell.strip("`") for cell in row[1:]) for row in rows}
    assert documented == {name: (t.folder, t.dev_file, t.metric) for name, t in TASKS.items()}


def _columns(sentence_start: str) -> list[str]:
    """The backticked names of the csv-columns paragraph that starts with ``sentence_start``."""
    paragraphs = section(RESULTS, "csv-columns").strip().split("\n\n")
    sentence = next(p for p in paragraphs if p.startswith(sentence_start)).removeprefix(sentence_start)
    return [name.strip() for chunk in re.findall(r"`([^`]+)`", sentence) for name in chunk.split(",")]


def _records() -> list[dict]:
    """Two configurations (two learning rates) with a downstream score: a swept key and a score column."""
    out = []
    for lr in (1e-3, 1e-2):
        config = {"method": {"name": "rigl", "label": "rigl", "config": {"delta_t": 5}}, "sparsity": 0.9,
                  "model": "gpt-nano", "seed": 0, "training": {"lr": lr}}
        out.append({"suite": "s", "run_id": f"r{lr}", "method": "rigl", "label": "rigl", "model": "gpt-nano",
                    "sparsity_target": 0.9, "seed": 0, "val_ppl": 20.0, "status": "ok", "config": config,
                    "downstream": {"glue/sst2": 0.8}})
    return out


def test_summary_csv_columns_are_the_documented_ones():
    from sparsebench.results import summaries_frame

    documented = _columns("`summary.csv` columns:")
    assert documented[-4:] == ["method_config", "warnings", "training.lr", "glue/sst2"]  # (JSON text), a count, a swept key, a score
    assert list(summaries_frame(_records()).columns) == documented


def test_table_csv_columns_are_the_documented_ones():
    from sparsebench.tables import METRICS, numeric_table

    named = _columns("`table.csv` columns:")
    metrics = [m.removesuffix("_mean") for m in named[named.index("<metric>_std") + 1:named.index("warnings")]]
    assert metrics == [*METRICS, "glue/sst2"]  # the six figures, then a downstream score (`glue/sst2_mean`)
    expected = [*named[:3], "training.lr", "n_seeds", "seeds",
                *[f"{m}{suffix}" for m in metrics for suffix in ("_mean", "_std")], *named[-4:]]
    assert list(numeric_table(_records()).columns) == expected


def test_files_listing_names_everything_a_finished_suite_writes(write_suite, tmp_path):
    from sparsebench.runner import run_suite

    outcome = run_suite(write_suite(methods=["dense"]), tmp_path / "out", console=Console(quiet=True))
    suite_dir = outcome.suite_dir
    listing = code_blocks(RESULTS.split("## Files\n", 1)[1], "")[0]
    documented = {line.split()[0].split("/", 2)[2] for line in listing.splitlines() if line.strip()}
    run_id = outcome.summaries[0]["run_id"]
    written = set()
    for path in suite_dir.rglob("*"):
        relative = path.relative_to(suite_dir).as_posix().replace(run_id, "<run-id>")
        relative = re.sub(r"ckpt-\d+\.pt$", "ckpt-*.pt", relative)
        if relative in ("<run-id>", "plots") or relative.endswith(".sha256"):
            continue  # folders are named by their files; a checkpoint's hash file is in checkpoints.md
        written.add("plots/" if relative.startswith("plots/") else relative)
    assert written <= documented, written - documented
    plots = {p.stem for p in (suite_dir / "plots").iterdir()}
    plots_section = RESULTS.split("### Plots\n", 1)[1].split("\n## ", 1)[0]
    plot_rows = {row[0].split("`")[1].split(".")[0] for row in table_rows(plots_section)}
    assert plots == plot_rows


def _is_option(param) -> bool:
    return getattr(param, "param_type_name", "") == "option" and not param.hidden  # typer vendors click


def _cli_options() -> dict[str, list[str]]:
    """Every visible ``--option`` of the ``sparsebench`` group ("") and of each command."""
    import typer.main

    from sparsebench.cli import app

    group = typer.main.get_command(app)
    out = {"": [o for p in group.params if _is_option(p) for o in p.opts if o.startswith("--")]}
    for name, command in group.commands.items():
        out[name] = [o for p in command.params if _is_option(p)
                     for o in [*p.opts, *p.secondary_opts] if o.startswith("--") and o != "--help"]
    assert out[""] == ["--version"] and "--glue-dir" in out["eval"]  # the walk sees the options
    return out


def test_every_cli_option_is_documented_in_the_readme_or_the_manual():
    pages = text(README) + "".join(text(p) for p in DOCS.glob("*.md"))
    missing = [f"{command} {option}" for command, options in _cli_options().items() for option in options
               if not re.search(rf"`[^`\n]*{re.escape(option)}(?![\w-])", pages)]
    assert not missing, missing
    assert "`sparsebench --version`" in text(README)


def _extras() -> set[str]:
    block = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+) *=", block, flags=re.M))


def test_the_extras_named_in_the_pages_exist_and_the_extras_table_lists_them_all():
    pages = text(README) + "".join(text(p) for p in DOCS.glob("*.md"))
    assert set(re.findall(r"sparsebench\[(\w+)\]", pages)) <= _extras()
    table = RESULTS.split("## Optional extras\n", 1)[1].split("\n## ", 1)[0]
    assert {row[0].strip("`") for row in table_rows(table)} == _extras()


# ------------------------------------------------------------------ checkpoints.md

CHECKPOINTS = text(DOCS / "checkpoints.md")


def test_the_documented_lock_file_is_the_one_a_run_takes(tmp_path):
    from sparsebench.run_lock import RunLock

    assert "`<out>/<suite>/.<run-id>.lock`" in CHECKPOINTS
    assert RunLock(tmp_path / "suite", "rigl-s0.9-x").path == tmp_path / "suite" / ".rigl-s0.9-x.lock"


def test_the_documented_disk_full_message_is_the_one_the_command_prints():
    from sparsebench.runner import DiskFull, _disk_full_message

    block = next(b for b in code_blocks(CHECKPOINTS, "text") if b.startswith("stopped: "))
    reason = re.search(r"^  `(disk full: [^`]+)`;$", CHECKPOINTS, flags=re.M).group(1)
    message = _disk_full_message(DiskFull(f"run <run-id> failed: {reason}", {"error": reason}, True))
    assert block.strip() == f"stopped: {message}"
