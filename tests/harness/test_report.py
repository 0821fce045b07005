"""Suite tables and plots: one row per configuration, numbers for programs, LaTeX for papers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from rich.console import Console

from sparsebench.runner import run_suite
from sparsebench.tables import numeric_table, pivot_table, render_latex, render_markdown
from tests.conftest import TINY_SUITE


def sb(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sparsebench", *map(str, args)], capture_output=True, text=True, env=env)


def _run(path: Path, out: Path, **overrides):
    return run_suite(path, out, overrides=overrides or None, console=Console(quiet=True))


@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory):
    """dense + static, two learning rates, two seeds: four rows of two seeds each."""
    root = tmp_path_factory.mktemp("report")
    suite = {**TINY_SUITE, "name": "lrs", "seeds": [0, 1], "sweep": {"training.lr": [1e-3, 3e-3]},
             "training": {**TINY_SUITE["training"], "steps": 10, "eval_every": 5}}
    path = root / "lrs.yaml"
    path.write_text(yaml.safe_dump(suite))
    outcome = _run(path, root / "out")
    assert not outcome.failed
    return root / "out" / "lrs"


def test_a_sweep_over_lr_gives_one_row_per_lr_with_an_lr_column(lr_sweep):
    table = pd.read_csv(lr_sweep / "table.csv")
    assert len(table) == 4
    assert sorted(table["training.lr"]) == [1e-3, 1e-3, 3e-3, 3e-3]
    assert list(table["n_seeds"]) == [2, 2, 2, 2]
    assert {(m, lr) for m, lr in zip(table["method"], table["training.lr"])} == {
        ("dense", 1e-3), ("dense", 3e-3), ("static", 1e-3), ("static", 3e-3)}
    assert "training.lr" in (lr_sweep / "table.md").read_text()


def test_tables_hold_numbers_for_programs(lr_sweep):
    table = pd.read_csv(lr_sweep / "table.csv")
    for column in ("val_ppl_mean", "val_ppl_std", "train_flops_vs_dense_mean", "n_seeds"):
        assert pd.api.types.is_numeric_dtype(table[column]), column
    assert (table["val_ppl_std"] > 0).all()
    summary = pd.read_csv(lr_sweep / "summary.csv")
    assert len(summary) == 8 and pd.api.types.is_float_dtype(summary["val_ppl"])
    assert not summary.astype(str).apply(lambda col: col.str.contains("±")).any().any()
    assert set(summary["training.lr"]) == {1e-3, 3e-3}


def test_report_writes_the_plots(lr_sweep):
    plots = lr_sweep / "plots"
    for name in ("pareto", "layer_density", "curves"):
        for fmt in ("png", "svg"):
            path = plots / f"{name}.{fmt}"
            assert path.is_file() and path.stat().st_size > 1000, path
    for path in plots.iterdir():
        path.unlink()
    result = sb("report", lr_sweep)
    assert result.returncode == 0, result.stderr
    assert (plots / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (plots / "curves.svg").read_text().lstrip().startswith("<?xml")


def test_report_pivot_gives_method_by_sparsity_of_val_ppl(lr_sweep):
    result = sb("report", lr_sweep, "--pivot")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert "0.8" in lines[0] and "method" in lines[0]
    assert len(lines) == 2 + 4  # header, rule, dense and static at two learning rates
    assert any(line.startswith("| static (lr=0.003)") for line in lines)


def test_rerunning_with_changed_steps_shows_only_the_current_runs(write_suite, tmp_path):
    path = write_suite(methods=["dense"])
    _run(path, tmp_path / "out")
    _run(path, tmp_path / "out", **{"training.steps": 10})
    suite_dir = tmp_path / "out" / "tiny"
    assert len(list(suite_dir.glob("*/summary.json"))) == 2  # the older run stays on disk
    table = pd.read_csv(suite_dir / "table.csv")
    assert len(table) == 1 and table["n_seeds"].tolist() == [1]
    assert pd.read_csv(suite_dir / "summary.csv")["steps"].tolist() == [10]
    everything = sb("report", suite_dir, "--all", "--format", "csv")
    assert everything.returncode == 0, everything.stderr
    every = pd.read_csv(pd.io.common.StringIO(everything.stdout))
    assert sorted(every["training.steps"]) == [10, 20]
    current = sb("report", suite_dir, "--format", "csv")
    assert len(pd.read_csv(pd.io.common.StringIO(current.stdout))) == 1


def test_report_on_a_folder_without_runs_fails_and_keeps_the_table(tmp_path):
    (tmp_path / "table.md").write_text("# kept\n")
    result = sb("report", tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "no run summaries" in result.stderr
    assert (tmp_path / "table.md").read_text() == "# kept\n"


# --------------------------------------------------------------------------------------------
# grouping and rendering, on hand-written records
# --------------------------------------------------------------------------------------------


def _record(label, seed, ppl, options, *, lr=1e-3, plugins=(), log_every=10, status="ok"):
    config = {"suite": "s", "run_id": f"{label}-{seed}-{ppl}", "seed": seed, "sparsity": 0.9, "model": "gpt-nano",
              "method": {"name": "static", "label": label, "config": options, "with": []},
              "plugins": [{"name": p, "config": {}, "with": [], "label": None} for p in plugins],
              "training": {"lr": lr, "log_every": log_every, "steps": 10}}
    return {"run_id": config["run_id"], "method": "static", "label": label, "seed": seed, "sparsity_target": 0.9,
            "model": "gpt-nano", "status": status, "val_ppl": ppl, "test_ppl": ppl, "train_flops_vs_dense": 0.5,
            "overhead_frac": 0.01, "wall_time_s": 1.0, "error": None if status == "ok" else "Boom: x", "config": config}


def test_two_entries_with_one_label_and_different_options_are_not_pooled():
    records = [_record("s", 0, 10.0, {"distribution": "erk"}), _record("s", 0, 20.0, {"distribution": "uniform"})]
    table = numeric_table(records, is_observer=lambda name: False)
    assert len(table) == 2 and table["distribution"].tolist() == ["erk", "uniform"]
    assert table["val_ppl_mean"].tolist() == [10.0, 20.0]


def test_seeds_pool_and_observers_or_log_cadence_do_not_split_a_row():
    records = [_record("s", 0, 10.0, {}), _record("s", 1, 12.0, {}, plugins=["tensorboard"], log_every=5)]
    table = numeric_table(records, is_observer=lambda name: name == "tensorboard")
    assert len(table) == 1 and table["n_seeds"].tolist() == [2]
    assert table["val_ppl_mean"].tolist() == [11.0]
    assert table["val_ppl_std"].iloc[0] == pytest.approx(2 ** 0.5)
    assert "plugins" not in table.columns and "training.log_every" not in table.columns


def test_latex_escapes_text_uses_booktabs_a_caption_and_bold_best():
    records = [_record("a&b_c 50%", 0, 10.0, {}, lr=1e-3), _record("a&b_c 50%", 0, 20.0, {}, lr=1e-2)]
    tex = render_latex(numeric_table(records, is_observer=lambda n: False), caption="lr_sweep & co")
    assert r"a\&b\_c 50\%" in tex and r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"\caption{lr\_sweep \& co}" in tex
    assert r"\textbf{10.00}" in tex and r"\textbf{20.00}" not in tex
    body = [line for line in tex.splitlines() if line.startswith("a")]
    assert len(body) == 2 and all(line.count(" & ") == body[0].count(" & ") for line in body)


def test_markdown_is_a_pipe_table_with_failures_in_the_status_column():
    records = [_record("s", 0, 10.0, {}), _record("s", 1, 0.0, {}, status="failed")]
    text = render_markdown(numeric_table(records, is_observer=lambda n: False), "title", floor=3.5)
    lines = text.splitlines()
    assert lines[0] == "# title" and "3.500" in lines[2]
    row = [line for line in lines if line.startswith("| s ")][0]
    assert "10.00" in row and "FAILED (1/2): Boom: x" in row


def test_pivot_fills_the_dense_reference_across_sparsities():
    numeric = pd.DataFrame({"method": ["dense", "rigl", "rigl"], "model": ["m"] * 3, "sparsity": [0.0, 0.8, 0.9],
                            "val_ppl_mean": [5.0, 6.0, 7.0], "n_seeds": [1] * 3})
    pivot = pivot_table(numeric)
    assert pivot.columns.tolist() == ["method", "0.8", "0.9"]
    assert pivot.set_index("method").loc["dense"].tolist() == [5.0, 5.0]
    assert pivot.set_index("method").loc["rigl"].tolist() == [6.0, 7.0]


def test_keep_checkpoints_0_deletes_a_runs_checkpoints_once_it_has_finished(write_suite, tmp_path):
    path = write_suite(methods=["dense"], training={**TINY_SUITE["training"], "keep_checkpoints": 0,
                                                   "checkpoint_every": 5})
    outcome = _run(path, tmp_path / "out")
    run_dir = tmp_path / "out" / "tiny" / outcome.summaries[0]["run_id"]
    assert outcome.summaries[0]["status"] == "ok" and (run_dir / "masks.pt").is_file()
    assert not list(run_dir.glob("ckpt-*"))
    result = sb("export", run_dir, tmp_path / "hf")
    assert result.returncode == 2 and "keep_checkpoints" in result.stderr


def test_version_prints_the_package_version():
    import sparsebench

    result = sb("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"sparsebench {sparsebench.__version__}"


def test_two_model_mappings_are_two_rows_with_their_differing_fields():
    records = [_record("s", 0, 10.0, {}), _record("s", 0, 20.0, {})]
    for record, width in zip(records, (32, 64)):
        record["config"]["model"] = {"family": "gpt2", "n_layer": 2, "n_embd": width}
    table = numeric_table(records, is_observer=lambda n: False)
    assert len(table) == 2 and table["model.n_embd"].tolist() == [32, 64]
    assert "model.n_layer" not in table.columns


def test_a_method_without_a_swept_option_shows_a_dash_not_nan():
    from sparsebench.tables import display_table, numeric_table

    records = [
        {"method": "static", "label": "static-erk", "sparsity_target": 0.9, "seed": 0, "status": "ok", "val_ppl": 2.0,
         "config": {"method": {"name": "static", "config": {"distribution": "erk"}}}},
        {"method": "static", "label": "static-uniform", "sparsity_target": 0.9, "seed": 0, "status": "ok", "val_ppl": 3.0,
         "config": {"method": {"name": "static", "config": {"distribution": "uniform"}}}},
        {"method": "dense", "label": "dense", "sparsity_target": 0.0, "seed": 0, "status": "ok", "val_ppl": 1.0,
         "config": {"method": {"name": "dense", "config": {}}}},
    ]
    shown = display_table(numeric_table(records))
    column = [c for c in shown.columns if "distribution" in c]
    assert column, shown.columns
    assert shown.loc[shown["method"] == "dense", column[0]].tolist() == ["—"]
    assert "nan" not in shown.astype(str).to_string()


def test_a_downstream_perplexity_is_best_when_lowest_and_an_accuracy_when_highest():
    from sparsebench.tables import metric_titles

    numeric = pd.DataFrame({"lm_eval/wikitext_word_perplexity_mean": [30.0, 20.0], "glue/sst2_mean": [0.8, 0.9]})
    titles = metric_titles(numeric)
    assert titles["lm_eval/wikitext_word_perplexity"][2] is True and titles["glue/sst2"][2] is False
