"""Logger observers (TensorBoard, CSV, Weights & Biases) and plain progress lines."""

from __future__ import annotations

import importlib.util
import io
import json
import sys

import pandas as pd
import pytest
import yaml
from rich.console import Console

from sparsebench.errors import SuiteError
from sparsebench.runner import run_suite
from sparsebench.suites import expand_suite

RIGL = {"rigl": {"delta_t": 5}}


def _run(write_suite, tmp_path, **overrides):
    path = write_suite(**{"methods": [RIGL], **overrides})
    return run_suite(path, tmp_path / "out", console=Console(quiet=True))


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_the_tensorboard_observer_writes_event_files(write_suite, tmp_path):
    outcome = _run(write_suite, tmp_path, plugins=["tensorboard"])
    assert not outcome.failed, outcome.failed
    run_dir = tmp_path / "out" / "tiny" / outcome.summaries[0]["run_id"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    scalars = _events(run_dir / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/sparsity", "val/ppl", "mask/turnover", "final/val_ppl"):
        assert tag in scalars, sorted(scalars)
    assert len(scalars["train/loss"]) == 4  # log_every 5 over 20 steps
    assert scalars["final/val_ppl"] == [pytest.approx(outcome.summaries[0]["val_ppl"], rel=1e-6)]
    densities = [t for t in scalars if t.startswith("density/")]
    assert densities and all(0 < v <= 1 for t in densities for v in scalars[t])
    assert scalars["mask/turnover"][0] == 0 and max(scalars["mask/turnover"]) > 0  # RigL moved weights


def test_an_observer_is_not_counted_in_the_method_overhead(write_suite, tmp_path):
    outcome = _run(write_suite, tmp_path, plugins=["tensorboard", "csv"])
    assert set(outcome.summaries[0]["method_time_by_plugin"]) <= {"rigl"}


def test_adding_the_tensorboard_observer_retrains_nothing(write_suite, tmp_path):
    first = _run(write_suite, tmp_path)
    again = _run(write_suite, tmp_path, plugins=["tensorboard"])
    assert again.skipped == len(first.summaries) == 1


def test_the_csv_observer_writes_every_number_in_long_format(write_suite, tmp_path):
    outcome = _run(write_suite, tmp_path, plugins=["csv"])
    run_dir = tmp_path / "out" / "tiny" / outcome.summaries[0]["run_id"]
    log = pd.read_csv(run_dir / "log.csv")
    assert list(log.columns) == ["step", "key", "value"]
    keys = set(log["key"])
    assert {"loss", "lr", "val_ppl", "sparsity", "mask/turnover", "final/test_ppl"} <= keys
    assert any(k.startswith("density/") for k in keys)
    wide = log[log["key"] == "loss"].set_index("step")["value"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert wide.to_dict() == {r["step"]: pytest.approx(r["loss"]) for r in records if "loss" in r}


def test_wandb_without_the_package_is_refused_in_one_line(write_suite, registry, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec → None, import fails
    path = write_suite(plugins=[{"wandb": {"project": "p"}}])
    with pytest.raises(SuiteError) as info:
        expand_suite(path, registry)
    assert "pip install sparsebench[wandb]" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_logs_without_a_network(write_suite, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    outcome = _run(write_suite, tmp_path, plugins=[{"wandb": {"project": "p", "mode": "offline"}}])
    assert not outcome.failed, outcome.failed
    run_dir = tmp_path / "out" / "tiny" / outcome.summaries[0]["run_id"]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))


def test_plain_progress_lines_when_stdout_is_not_a_terminal(write_suite, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_PROGRESS_SECONDS", "0")
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    run_suite(write_suite(methods=["dense"]), tmp_path / "out", console=console)
    lines = [line for line in buffer.getvalue().splitlines() if " step " in line]
    steps = [line.split(" step ")[1].split()[0] for line in lines if "loss" in line]
    assert steps == ["5/20", "10/20", "15/20", "20/20"], buffer.getvalue()  # every logged step (interval 0)
    assert all("tok/s" in line and "ETA" in line for line in lines if "loss" in line)
    assert "val ppl" in lines[-1]  # the final evaluation


@pytest.mark.parametrize("package, entry", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                            ("wandb", {"wandb": {"project": "p"}})])
def test_a_logger_without_its_package_is_refused_before_training_saying_what_to_install(
        write_suite, tmp_path, monkeypatch, package, entry):
    from sparsebench.errors import SuiteError

    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(SuiteError, match=rf"pip install sparsebench\[{package}\]"):
        _run(write_suite, tmp_path, plugins=[entry])
    assert not (tmp_path / "out").exists()  # nothing written
