"""The command line: the main job's results, and bad input refused in one line before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sparsebench.results import SUMMARY_KEYS


def sb(*args, env=None, cwd=None):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sparsebench", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=cwd)


@pytest.fixture(scope="module")
def finished_suite(tmp_path_factory):
    """One tiny suite (dense + static, two seeds) run through the CLI."""
    from tests.conftest import TINY_SUITE

    root = tmp_path_factory.mktemp("cli")
    suite = {**TINY_SUITE, "seeds": [0, 1], "methods": ["dense", {"static": {"distribution": "erk"}}]}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(suite))
    result = sb("run", path, "--out", root / "out")
    assert result.returncode == 0, result.stderr
    return root / "out" / "tiny", result


def test_run_writes_the_contracts_results_files_and_keys(finished_suite):
    suite_dir, _ = finished_suite
    run_dirs = sorted(p for p in suite_dir.iterdir() if p.is_dir() and p.name != "plots")
    assert len(run_dirs) == 4
    for run_dir in run_dirs:
        for name in ("config.yaml", "metrics.jsonl", "summary.json", "masks.pt"):
            assert (run_dir / name).is_file(), f"{run_dir.name}/{name} missing"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert set(SUMMARY_KEYS) <= set(summary)
        assert summary["status"] == "ok" and summary["error"] is None
        masks = torch.load(run_dir / "masks.pt", weights_only=True)
        # layer_density is per logical layer: GPT-2's c_attn appears as [q], [k] and [v]
        assert set(masks) == {name.split("[")[0] for name in summary["layer_density"]}
        assert all(masks[n].shape == (32, 96) for n in masks if n.endswith("c_attn.weight"))
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["run_id"] == run_dir.name == summary["run_id"]
    assert (suite_dir / "summary.csv").is_file() and (suite_dir / "table.md").is_file()


def test_summary_figures_are_consistent(finished_suite):
    suite_dir, _ = finished_suite
    for path in suite_dir.glob("*/summary.json"):
        s = json.loads(path.read_text())
        if s["method"] == "dense":
            assert s["sparsity_actual"] == 0 and s["train_flops_vs_dense"] == pytest.approx(1.0)
        else:
            assert s["sparsity_actual"] == pytest.approx(0.8, abs=1e-3)
            assert s["inference_flops_vs_dense"] < 1 and s["train_flops_vs_dense"] < 1
        assert s["tokens"] == 20 * 4 * 16
        assert s["val_ppl"] > s["entropy_floor_ppl"] > 1
        assert 0 <= s["overhead_frac"] < 1 and s["peak_memory_bytes"] > 0


def test_table_shows_mean_and_std_over_seeds_and_the_floor(finished_suite):
    suite_dir, result = finished_suite
    table = (suite_dir / "table.md").read_text()
    assert "floor exp(H)" in table and "±" in table
    assert "static" in result.stdout and "dense" in result.stdout


def test_report_rerenders_tables_in_three_formats(finished_suite):
    suite_dir, _ = finished_suite
    md, csv, tex = (sb("report", suite_dir, "--format", f) for f in ("md", "csv", "latex"))
    assert md.returncode == csv.returncode == tex.returncode == 0
    assert md.stdout.count("| method ") == 1 and "val_ppl_mean" in csv.stdout.splitlines()[0] and r"\begin{tabular}" in tex.stdout


def test_rerunning_skips_finished_runs(finished_suite):
    suite_dir, _ = finished_suite
    suite_path = suite_dir.parent.parent / "tiny.yaml"
    before = {p: p.stat().st_mtime_ns for p in suite_dir.glob("*/summary.json")}
    result = sb("run", suite_path, "--out", suite_dir.parent)
    assert result.returncode == 0 and "4 run(s) already had results" in result.stdout
    assert before == {p: p.stat().st_mtime_ns for p in suite_dir.glob("*/summary.json")}


def test_methods_lists_package_hooks_and_options():
    result = sb("methods")
    assert result.returncode == 0
    assert "static" in result.stdout and "distribution" in result.stdout and "init_mask" in result.stdout


def _refused(result, *needles):
    assert result.returncode != 0
    err = result.stderr.strip()
    assert "Traceback" not in err and "Traceback" not in result.stdout
    assert err.startswith("error:"), err
    for needle in needles:
        assert needle in " ".join(err.split()), err
    return err


@pytest.mark.parametrize("command", ["run", "validate"])
def test_bad_suite_is_refused_in_one_line_without_traceback(tmp_path, command):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nmethods: [statik]\n")
    _refused(sb(command, path, "--out", tmp_path) if command == "run" else sb(command, path),
             "methods[0]", "Did you mean 'static'")
    assert not (tmp_path / "bad").exists()  # nothing trained


def test_missing_suite_file_is_refused(tmp_path):
    _refused(sb("validate", tmp_path / "nope.yaml"), "nope.yaml", "not found")


def test_unreachable_hub_dataset_is_refused_before_training_with_local_advice(tmp_path):
    from tests.conftest import TINY_SUITE

    suite = {**TINY_SUITE, "name": "hub", "data": {"dataset": "hf", "path": "wikitext",
                                                  "name": "wikitext-2-raw-v1", "tokenizer": "bytes"}}
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(suite))
    err = _refused(sb("run", path, "--out", tmp_path / "out"), "wikitext")
    assert "local" in err
    assert not list((tmp_path / "out").glob("hub/*/summary.json"))


def test_validate_lists_the_runs_of_a_valid_suite():
    result = sb("validate", Path(__file__).parents[2] / "suites" / "smoke.yaml")
    assert result.returncode == 0 and "ok" in result.stdout and "dense" in result.stdout
