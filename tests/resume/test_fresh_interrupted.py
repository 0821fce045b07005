"""``--fresh`` retires the old results before training: interrupted, it never leaves them to be reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict
from rich.console import Console

from sparsebench import hookimpl
from sparsebench.checkpoints import list_checkpoints
from sparsebench.methods import Method
from sparsebench.runner import run_suite
from tests.conftest import TINY_SUITE
from tests.helpers import registry_with


class Interrupter(Method):
    """Raises KeyboardInterrupt (Ctrl-C at once) after step ``at`` while its flag file exists."""

    name = "interrupter"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        flag: str = ""
        at: int = 5

    @hookimpl
    def after_optimizer_step(self, run, step):
        if step == self.config.at and Path(self.config.flag).exists():
            raise KeyboardInterrupt


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_an_interrupted_fresh_run_is_resumed_by_the_next_run_never_reported_stale(tmp_path):
    flag = tmp_path / "flag"
    suite = {**TINY_SUITE, "training": {**TINY_SUITE["training"], "steps": 8, "checkpoint_every": 2, "log_every": 1,
                                        "eval_every": 4},
             "methods": [{"interrupter": {"flag": str(flag)}}]}
    path, out = tmp_path / "tiny.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(suite))
    registry, quiet = registry_with(Interrupter), Console(quiet=True)
    (first,) = run_suite(path, out, registry, console=quiet).summaries
    run_dir = out / "tiny" / first["run_id"]
    old_summary = (run_dir / "summary.json").read_text()

    flag.touch()
    with pytest.raises(KeyboardInterrupt):
        run_suite(path, out, registry, fresh=True, console=quiet)
    assert not (run_dir / "summary.json").exists() and not (run_dir / "masks.pt").exists()  # retired before training
    assert [s for s, _ in list_checkpoints(run_dir)] == [4] and _steps(run_dir) == [1, 2, 3, 4]
    assert not list((out / "tiny").glob(".*.tmp"))  # the retired folder is gone, not left beside

    flag.unlink()
    again = run_suite(path, out, registry, console=quiet)
    assert again.skipped == 0 and again.summaries[0]["status"] == "ok"
    assert "resumed from ckpt-00000004.pt" in (run_dir / "resume.log").read_text()
    assert (run_dir / "summary.json").read_text() != old_summary  # a new summary
    assert _steps(run_dir) == [*range(1, 9), 8]  # each step once (the final validation is its own record)
    for key in ("val_loss", "test_loss", "train_flops"):
        assert again.summaries[0][key] == first[key]
