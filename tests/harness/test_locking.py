"""One trainer per run: processes sharing a suite's folder share its runs; a killed holder's lock is free."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from typer.testing import CliRunner

from sparsebench import hookimpl
from sparsebench.cli import app
from sparsebench.methods import Method
from sparsebench.run_lock import RunLock
from sparsebench.runner import run_suite
from tests.conftest import TINY_SUITE
from tests.helpers import registry_with

ROOT = Path(__file__).resolve().parents[2]


class Counter(Method):
    """Notes ``<pid> <run id>`` in ``file`` when a run starts training, then waits while ``gate`` is missing."""

    name = "counter"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        file: str = ""
        gate: str = ""

    @hookimpl
    def on_train_start(self, run):
        with open(self.config.file, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {run.config.run_id}\n")
        deadline = time.monotonic() + 120
        while self.config.gate and not Path(self.config.gate).exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def _suite(tmp_path: Path, seeds=(0, 1), steps: int = 6) -> Path:
    suite = {
        **TINY_SUITE,
        "training": {**TINY_SUITE["training"], "steps": steps, "checkpoint_every": 2, "eval_every": 3, "log_every": 1},
        "seeds": list(seeds),
        "plugins": [{"counter": {"file": str(tmp_path / "trained.txt"), "gate": str(tmp_path / "go")}}],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def _trained(tmp_path: Path) -> list[tuple[int, str]]:
    path = tmp_path / "trained.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(pid), run_id) for pid, run_id in (line.split() for line in lines)]


# A `sparsebench run` whose registry has the Counter (as an installed plugin package would).
_CLI = (
    "import sys; import sparsebench.runner as r; from tests.helpers import registry_with; "
    "from tests.harness.test_locking import Counter; r.load_registry = lambda: registry_with(Counter); "
    "from sparsebench.cli import app; app(sys.argv[1:], prog_name='sparsebench')"
)


def _spawn(suite: Path, out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-c", _CLI, "run", str(suite), "--out", str(out)],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait_for(condition, procs, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        assert all(p.poll() is None for p in procs), "a process ended early"
        time.sleep(0.05)


def _metrics_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_on_one_suite_train_every_run_exactly_once(tmp_path):
    suite, out = _suite(tmp_path), tmp_path / "out"
    procs = [_spawn(suite, out, tmp_path / f"log{i}.txt") for i in range(2)]
    try:
        # Both are inside a run at once (the gate holds them there): two different runs, or the lock failed.
        _wait_for(lambda: len(_trained(tmp_path)) >= 2, procs)
        (tmp_path / "go").touch()
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"log{i}.txt").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    trained = _trained(tmp_path)
    run_ids = [run_id for _, run_id in trained]
    assert len(run_ids) == 4 and len(set(run_ids)) == 4, trained  # every run trained, none twice
    assert len({pid for pid, _ in trained[:2]}) == 2  # the two first runs were trained side by side
    assert any("running elsewhere" in log for log in logs), logs
    for run_id in run_ids:
        run_dir = out / "tiny" / run_id
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "ok"
        steps = _metrics_steps(run_dir)
        assert steps == [*range(1, 7), 6], steps  # each step once (the final validation is its own record)
        assert not (run_dir / "resume.log").exists()  # nobody "resumed" another's checkpoint
    table = (out / "tiny" / "table.md").read_text()
    assert "FAILED" not in table


def test_a_run_another_process_holds_is_left_to_it_and_is_not_a_failure(tmp_path):
    suite, out = _suite(tmp_path, seeds=(0,)), tmp_path / "out"
    (tmp_path / "go").touch()
    registry = registry_with(Counter)
    held = run_suite(suite, out, registry, console=Console(quiet=True))  # learn the run ids
    held_id, free_id = (s["run_id"] for s in held.summaries)
    lock = RunLock(out / "tiny", held_id)
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sparsebench.runner.load_registry", lambda: registry)
        assert lock.acquire()
        try:
            result = runner.invoke(app, ["run", str(suite), "--out", str(out), "--fresh"])
        finally:
            lock.release()
        assert result.exit_code == 0, result.output
        assert f"{held_id}: running elsewhere" in result.output
        assert "1 run(s) are running elsewhere" in result.output and held_id in result.output.split("left to it:")[1]
        assert [run_id for _, run_id in _trained(tmp_path)][-1] == free_id  # --fresh retrained the free one only
        again = runner.invoke(app, ["run", str(suite), "--out", str(out)])
    assert again.exit_code == 0 and "2 run(s) already had results" in again.output, again.output


def test_the_lock_of_a_killed_process_is_free_and_its_run_is_trained(tmp_path):
    suite, out = _suite(tmp_path, seeds=(0,)), tmp_path / "out"
    proc = _spawn(suite, out, tmp_path / "log.txt")
    try:
        _wait_for(lambda: len(_trained(tmp_path)) >= 1, [proc])  # inside its first run, holding the lock
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (pid, run_id), = _trained(tmp_path)
    assert pid == proc.pid and (out / "tiny" / f".{run_id}.lock").exists()
    (tmp_path / "go").touch()
    outcome = run_suite(suite, out, registry_with(Counter), console=Console(quiet=True))
    assert outcome.elsewhere == [] and not outcome.failed and len(outcome.summaries) == 2
    assert [r for _, r in _trained(tmp_path)][1] == run_id  # the killed process's run, trained here
