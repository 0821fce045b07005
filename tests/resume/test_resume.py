"""Resuming: a run stopped at any point (SIGKILL, Ctrl-C) and re-run ends with the same numbers.

In-process tests resume the reference run of tests/resume/test_checkpoint.py (a method drawing from
every random source, dropout on); subprocess tests kill the real ``sparsebench run`` command.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from rich.console import Console

from sparsebench import hookimpl
from sparsebench.checkpoints import Checkpointer, list_checkpoints, read_checkpoint
from sparsebench.interrupts import InterruptGuard, RunInterrupted
from sparsebench.loop import train
from sparsebench.atomic import remove_stale_temporaries
from sparsebench.results import comparison_table, render_markdown, summaries_frame, write_json, write_suite_tables
from sparsebench.runner import run_suite
from sparsebench.run_setup import setup_run
from tests.conftest import TINY_SUITE
from tests.resume.test_checkpoint import assert_same_final_state, final_state, metrics_records, reference, train_in  # noqa: F401


# --------------------------------------------------------------------------------------------
# in process
# --------------------------------------------------------------------------------------------


def test_resuming_from_a_later_checkpoint_ends_identical_and_adds_up_the_timers(reference, tmp_path):
    run_dir = reference.copy(tmp_path / "run", [4, 8])
    saved = torch.load(run_dir / "ckpt-00000008.pt", weights_only=True)
    setup, result, messages = train_in(reference.cfg, reference.registry, run_dir, resume=True)
    assert messages == [f"{reference.cfg.run_id}: resumed from ckpt-00000008.pt (step 8 of 12)"]
    assert_same_final_state(final_state(setup, result), reference.state)
    records = metrics_records(run_dir)
    assert records == metrics_records(reference.run_dir)  # lines after step 8 were truncated, then rewritten
    assert [r["step"] for r in records] == [*range(1, 13), 12]  # the final validation is its own record
    assert result.timings.total_s > saved["timings"]["total_s"] and result.timings.step_s > saved["timings"]["step_s"]
    assert setup.timer.seconds["churn"] > saved["hook_seconds"]["churn"]


class CtrlC:
    """Observer that presses Ctrl-C ``times`` times in the middle of step ``at`` (after the optimizer step)."""

    name = "ctrl_c"
    observer = True

    def __init__(self, at: int, times: int = 1):
        self.at, self.times = at, times

    @hookimpl
    def after_optimizer_step(self, run, step):
        if step == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


def _interrupted_run(reference, run_dir: Path, times: int):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed in the main thread")
    run_dir.mkdir()
    # Python's handler, as under a terminal, even where the tests run with SIGINT ignored (a background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with InterruptGuard() as guard:
            setup = setup_run(reference.cfg, reference.registry, run_dir, [("ctrl_c", CtrlC(at=6, times=times))])
            try:
                train(setup, checkpoints=Checkpointer(setup, resume=False, interrupt=guard))
            finally:
                setup.run.metrics.close()
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_the_ctrl_c_guard_puts_the_handler_back_and_respects_an_ignored_sigint():
    previous = signal.getsignal(signal.SIGINT)
    try:
        for before in (signal.default_int_handler, signal.SIG_IGN):
            signal.signal(signal.SIGINT, before)
            with InterruptGuard() as guard:
                inside = signal.getsignal(signal.SIGINT)
            assert signal.getsignal(signal.SIGINT) is before
            assert inside == (guard._handle if before is signal.default_int_handler else signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_at_the_end_of_the_step_with_a_checkpoint_and_resume_matches(reference, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(RunInterrupted) as stop:
        _interrupted_run(reference, run_dir, times=1)
    assert stop.value.step == 6 and stop.value.checkpoint == run_dir / "ckpt-00000006.pt"
    assert [s for s, _ in list_checkpoints(run_dir)] == [6, 4]
    setup, result, messages = train_in(reference.cfg, reference.registry, run_dir, resume=True)
    assert "resumed from ckpt-00000006.pt (step 6 of 12)" in messages[0]
    assert_same_final_state(final_state(setup, result), reference.state)
    assert metrics_records(run_dir) == metrics_records(reference.run_dir)


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(reference, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt) as stop:
        _interrupted_run(reference, run_dir, times=2)
    assert not isinstance(stop.value, RunInterrupted)
    assert [s for s, _ in list_checkpoints(run_dir)] == [4]


def _suite(path: Path, **training) -> Path:
    suite = {**TINY_SUITE, "training": {**TINY_SUITE["training"], "steps": 6, **training}}
    path.write_text(yaml.safe_dump(suite))
    return path


def test_a_changed_config_never_reuses_old_results(tmp_path):
    suite, out = _suite(tmp_path / "tiny.yaml"), tmp_path / "out"
    first = run_suite(suite, out, console=Console(quiet=True))
    again = run_suite(suite, out, console=Console(quiet=True))
    assert again.skipped == 2 and [s["run_id"] for s in again.summaries] == [s["run_id"] for s in first.summaries]
    changed = run_suite(suite, out, overrides={"training.lr": 0.002}, console=Console(quiet=True))
    assert changed.skipped == 0
    assert not {s["run_id"] for s in changed.summaries} & {s["run_id"] for s in first.summaries}
    assert len([p for p in (out / "tiny").iterdir() if p.is_dir() and p.name != "plots"]) == 4


def test_fresh_reruns_finished_runs_from_scratch(tmp_path):
    suite, out = _suite(tmp_path / "tiny.yaml", checkpoint_every=2), tmp_path / "out"
    first = run_suite(suite, out, console=Console(quiet=True))
    run_dir = out / "tiny" / first.summaries[0]["run_id"]
    (run_dir / "ckpt-00000099.pt").write_bytes(b"stale")  # a fresh start must not leave it behind
    fresh = run_suite(suite, out, fresh=True, console=Console(quiet=True))
    assert fresh.skipped == 0
    assert [s for s, _ in list_checkpoints(run_dir)] == [6]
    assert not (run_dir / "resume.log").exists()
    for a, b in zip(first.summaries, fresh.summaries):
        assert (a["val_loss"], a["test_loss"], a["train_flops"]) == (b["val_loss"], b["test_loss"], b["train_flops"])


# --------------------------------------------------------------------------------------------
# killing the real command
# --------------------------------------------------------------------------------------------

TIMING_KEYS = {
    "wall_time_s", "train_time_s", "eval_time_s", "method_time_s", "method_time_by_plugin", "overhead_frac",
    "upkeep_frac", "tokens_per_s", "peak_memory_bytes",
}
CLI_SUITE = {
    **TINY_SUITE,
    "model": {**TINY_SUITE["model"], "resid_pdrop": 0.1},
    "training": {**TINY_SUITE["training"], "steps": 24, "checkpoint_every": 4, "eval_every": 10, "log_every": 2},
}


def _env() -> dict:
    # One thread: no spinning on a busy 2-core machine; every run of these tests uses the same count
    # (results are bit-identical for a given thread count, not across counts).
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background job inherits SIGINT ignored


def _spawn(suite: Path, out: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sparsebench", "run", str(suite), "--out", str(out)],
                            env=_env(), preexec_fn=_default_sigint, **kwargs)


def _checkpoints(out: Path) -> set:
    return {(p, p.stat().st_mtime_ns) for p in out.glob("*/*/ckpt-*.pt") if p.exists()}


def _wait_for_new_checkpoint(proc: subprocess.Popen, out: Path, before: set, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if _checkpoints(out) - before:
                return
        except FileNotFoundError:  # a checkpoint pruned while listing
            pass
        time.sleep(0.02)


class CliReference:
    def __init__(self, suite: Path, suite_dir: Path, span: float):
        self.suite, self.suite_dir, self.span = suite, suite_dir, span


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    """The suite run once without interruption; ``span``: seconds from its first checkpoint to its end."""
    root = tmp_path_factory.mktemp("cli-reference")
    suite = root / "tiny.yaml"
    suite.write_text(yaml.safe_dump(CLI_SUITE))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSEBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "sparsebench-cache"))
        proc = _spawn(suite, root / "out", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait_for_new_checkpoint(proc, root / "out", set())
        first = time.monotonic()
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return CliReference(suite, root / "out" / "tiny", time.monotonic() - first)


def assert_results_intact(suite_dir: Path) -> None:
    """Every results file present parses completely: a kill never leaves a torn one."""
    for path in suite_dir.glob("*/summary.json"):
        assert json.loads(path.read_text())["status"] == "ok"
    for path in suite_dir.glob("*/masks.pt"):
        torch.load(path, weights_only=True)
    for _, path in [c for run_dir in suite_dir.iterdir() if run_dir.is_dir() for c in list_checkpoints(run_dir)]:
        read_checkpoint(path)
    if (suite_dir / "summary.csv").exists():
        pd.read_csv(suite_dir / "summary.csv")
    if (suite_dir / "table.md").exists():
        assert (suite_dir / "table.md").read_text().startswith("# tiny\n")


def assert_same_results(got: Path, want: Path, note: str = "") -> None:
    """Figures (timings aside), masks, final weights and metrics are bit-identical."""
    want_runs = sorted(p.name for p in want.iterdir() if p.is_dir() and p.name != "plots")
    assert sorted(p.name for p in got.iterdir() if p.is_dir() and p.name != "plots") == want_runs, note
    for name in want_runs:
        a, b = json.loads((got / name / "summary.json").read_text()), json.loads((want / name / "summary.json").read_text())
        assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == {k: v for k, v in b.items() if k not in TIMING_KEYS}, note
        masks_a, masks_b = (torch.load(d / name / "masks.pt", weights_only=True) for d in (got, want))
        assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_b), note
        (_, ckpt_a), (_, ckpt_b) = list_checkpoints(got / name)[0], list_checkpoints(want / name)[0]
        model_a, model_b = (read_checkpoint(p)["model"] for p in (ckpt_a, ckpt_b))
        assert all(torch.equal(model_a[k], model_b[k]) for k in model_b), note
        assert metrics_records(got / name) == metrics_records(want / name), note


def test_sigkill_at_random_points_then_rerunning_gives_identical_results(cli_reference, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    rng, out, kills = random.Random(seed), tmp_path / "out", []
    for _ in range(2):
        before = _checkpoints(out) if out.exists() else set()
        proc = _spawn(cli_reference.suite, out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_new_checkpoint(proc, out, before)
        delay = rng.uniform(0, cli_reference.span)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        kills.append(round(delay, 3))
        assert_results_intact(out / "tiny")
    result = subprocess.run([sys.executable, "-m", "sparsebench", "run", str(cli_reference.suite), "--out", str(out)],
                            env=_env(), capture_output=True, text=True)
    note = f"random seed {seed}, killed {kills} s after a new checkpoint"
    assert result.returncode == 0, result.stderr + note
    assert_same_results(out / "tiny", cli_reference.suite_dir, note)


def test_ctrl_c_checkpoints_prints_the_resume_command_and_exits_130(cli_reference, tmp_path):
    out = tmp_path / "out"
    proc = _spawn(cli_reference.suite, out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_new_checkpoint(proc, out, set())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    stopped = re.search(r"interrupted after step (\d+) of run (\S+); checkpoint (\S+)\.$", err, re.M)
    assert stopped, err
    step, run_id = int(stopped.group(1)), stopped.group(2)
    assert Path(stopped.group(3)) == out / "tiny" / run_id / f"ckpt-{step:08d}.pt" and Path(stopped.group(3)).is_file()
    assert not (out / "tiny" / run_id / "summary.json").exists()
    (command,) = [line.removeprefix("resume with: ") for line in err.splitlines() if line.startswith("resume with: ")]
    assert command == shlex.join(["sparsebench", "run", str(cli_reference.suite), "--out", str(out)])
    result = subprocess.run([sys.executable, "-m", *shlex.split(command)], env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"resumed from ckpt-{step:08d}.pt" in result.stdout + result.stderr
    assert_same_results(out / "tiny", cli_reference.suite_dir)


# --------------------------------------------------------------------------------------------
# results files under random kills
# --------------------------------------------------------------------------------------------


def _summary(version: str) -> dict:
    """A large summary (big files make kills land mid-write) in two distinguishable versions."""
    layers = {f"transformer.h.{i}.mlp.c_fc.weight": (i % 97) / 97 for i in range(20_000)}
    return {"suite": "atomic", "run_id": "r", "method": f"method-{version}", "label": f"method-{version}",
            "model": "m", "sparsity_target": 0.9, "status": "ok", "val_ppl": 1.5, "test_ppl": 1.6,
            "layer_density": layers, "method_config": {}, "versions": {}}


def _write_forever(suite_dir: Path) -> None:
    versions = [_summary("a"), _summary("b")]
    i = 0
    while True:
        write_json(suite_dir / "r" / "summary.json", versions[i % 2])
        write_suite_tables(suite_dir, "atomic")
        i += 1


def test_results_files_are_old_or_new_never_torn_under_random_kills(tmp_path):
    suite_dir = tmp_path / "atomic"
    expected = {v: _summary(v) for v in "ab"}
    tables = {render_markdown(comparison_table([s]), "atomic", None) for s in expected.values()}
    csvs = {summaries_frame([s]).to_csv(index=False) for s in expected.values()}
    write_json(suite_dir / "r" / "summary.json", expected["a"])
    write_suite_tables(suite_dir, "atomic")
    rng, seen = random.Random(), set()
    context = multiprocessing.get_context("fork")
    for _ in range(15):
        writer = context.Process(target=_write_forever, args=(suite_dir,))
        writer.start()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        summary = json.loads((suite_dir / "r" / "summary.json").read_text())
        assert summary in expected.values()
        assert (suite_dir / "table.md").read_text() in tables
        assert (suite_dir / "summary.csv").read_text() in csvs
        seen.add(summary["method"])
    assert seen == {"method-a", "method-b"}  # the writer did replace the files between kills
    remove_stale_temporaries(suite_dir / "r")
    remove_stale_temporaries(suite_dir)
    assert not list(suite_dir.glob("**/.*.tmp"))
