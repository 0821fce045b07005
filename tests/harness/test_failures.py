"""Failure isolation: a run that raises or diverges is recorded as failed, the others go on."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from typer.testing import CliRunner

from sparsebench import hookimpl
from sparsebench.atomic import atomic_write_text
from sparsebench.checkpoints import list_checkpoints, read_checkpoint
from sparsebench.cli import app
from sparsebench.methods import Method
from sparsebench.runner import run_suite
from tests.conftest import TINY_SUITE
from tests.helpers import registry_with, swap_first_pair

CORE_HOOKS = ["init_mask", "update_mask", "loss_terms", "on_mask_change"]


class RaiserConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hook: Literal["init_mask", "update_mask", "loss_terms", "on_mask_change"] = "init_mask"


class Raiser(Method):
    """Raises in the configured core hook at step 2 (``init_mask``: at once)."""

    name = "raiser"
    Config = RaiserConfig

    def _maybe_raise(self, hook: str, step: int = 2) -> None:
        if self.config.hook == hook and step == 2:
            raise RuntimeError(f"boom in {hook}")

    @hookimpl
    def init_mask(self, run, model):
        self._maybe_raise("init_mask")
        masks = {}
        for name, p in run.sparsifiable.items():
            mask = torch.ones(p.numel(), dtype=torch.bool)
            mask[: p.numel() // 2] = False
            masks[name] = mask.view_as(p)
        return masks

    @hookimpl
    def loss_terms(self, run, step, batch, outputs):
        self._maybe_raise("loss_terms", step)

    @hookimpl
    def update_mask(self, run, step, masks):
        self._maybe_raise("update_mask", step)
        if self.config.hook != "on_mask_change" or step != 2:
            return None
        return swap_first_pair(masks)  # one pruned and one active position swapped

    @hookimpl
    def on_mask_change(self, run, step, old, new):
        self._maybe_raise("on_mask_change", step)


class NanMaker(Method):
    """Writes NaN into the embedding after step 3, so the loss of step 4 is NaN."""

    name = "nan_maker"

    @hookimpl
    def after_optimizer_step(self, run, step):
        if step == 3:
            with torch.no_grad():
                run.model.get_input_embeddings().weight.fill_(float("nan"))


@pytest.fixture(scope="module")
def failing_suite(tmp_path_factory):
    """One suite run through the CLI: dense, a run raising in each core hook, one diverging, static."""
    tmp_path = tmp_path_factory.mktemp("failing")
    registry = registry_with(Raiser, NanMaker)
    suite = {
        **TINY_SUITE,
        "training": {**TINY_SUITE["training"], "steps": 5},
        "methods": ["dense"] + [{"raiser": {"hook": h, "label": f"raise-{h}"}} for h in CORE_HOOKS]
                   + ["nan_maker", {"static": {"distribution": "erk"}}],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(suite))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sparsebench.runner.load_registry", lambda: registry)
        mp.setenv("SPARSEBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "sparsebench-cache"))
        result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    summaries = {s["label"]: s for s in map(json.loads, map(Path.read_text, (tmp_path / "out" / "tiny").glob("*/summary.json")))}
    return result, summaries, tmp_path / "out" / "tiny"


def test_the_command_exits_non_zero_when_a_run_failed(failing_suite):
    result, _, _ = failing_suite
    assert result.exit_code == 1, result.output
    assert "5 run(s) failed" in result.output


def test_runs_around_failing_ones_complete(failing_suite):
    _, summaries, _ = failing_suite
    assert len(summaries) == 7
    for label in ("dense", "static"):  # before and after the failing ones
        assert summaries[label]["status"] == "ok" and summaries[label]["val_ppl"] > 1


@pytest.mark.parametrize("hook", CORE_HOOKS)
def test_an_exception_in_a_core_hook_fails_the_run_naming_plugin_and_hook(failing_suite, hook):
    _, summaries, suite_dir = failing_suite
    summary = summaries[f"raise-{hook}"]
    assert summary["status"] == "failed"
    assert summary["error"] == f"HookError: plugin 'raiser' raised in hook '{hook}': RuntimeError: boom in {hook}"
    log = (suite_dir / summary["run_id"] / "error.log").read_text()
    assert log.startswith("Traceback") and f"boom in {hook}" in log


def test_a_non_finite_loss_fails_the_run_with_its_step(failing_suite):
    _, summaries, suite_dir = failing_suite
    summary = summaries["nan_maker"]
    assert summary["status"] == "failed"
    assert summary["error"].startswith("NonFiniteLoss: loss became non-finite at step 4 (cross-entropy nan")
    assert "\n" not in summary["error"]
    assert "Traceback" in (suite_dir / summary["run_id"] / "error.log").read_text()


def test_the_table_shows_failed_runs(failing_suite):
    result, summaries, suite_dir = failing_suite
    rows = {line.split("|")[1].strip(): line for line in (suite_dir / "table.md").read_text().splitlines()[4:]}
    assert "FAILED (1/1): HookError: plugin 'raiser' raised in hook 'loss_terms'" in rows["raise-loss_terms"]
    assert "FAILED (1/1): NonFiniteLoss" in rows["nan_maker"]
    assert rows["dense"].rstrip(" |").endswith("ok") and rows["static"].rstrip(" |").endswith("ok")
    assert result.output.count("FAILED") >= 5  # the printed table too
    csv = (suite_dir / "summary.csv").read_text()
    assert csv.count(",failed,") == 5


class Flaky(Method):
    """Raises at step 5 while its flag file exists (a transient failure: a full disk, a lost GPU)."""

    name = "flaky"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        flag: str = ""

    @hookimpl
    def after_optimizer_step(self, run, step):
        if step == 5 and Path(self.config.flag).exists():
            raise OSError("transient trouble")


def test_a_failed_run_is_rerun_from_its_last_checkpoint_and_matches_an_unbroken_one(tmp_path):
    registry = registry_with(Flaky)
    flag = tmp_path / "flag"
    suite = {**TINY_SUITE, "training": {**TINY_SUITE["training"], "steps": 8, "checkpoint_every": 2},
             "methods": [{"flaky": {"flag": str(flag)}}]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(suite))
    quiet = Console(quiet=True)
    flag.touch()
    (failed,) = run_suite(path, tmp_path / "out", registry, console=quiet).summaries
    run_dir = tmp_path / "out" / "tiny" / failed["run_id"]
    assert failed["status"] == "failed" and (run_dir / "error.log").exists()
    assert [s for s, _ in list_checkpoints(run_dir)] == [4]
    flag.unlink()
    (resumed,) = run_suite(path, tmp_path / "out", registry, console=quiet).summaries
    assert resumed["status"] == "ok" and not (run_dir / "error.log").exists()
    assert "resumed from ckpt-00000004.pt" in (run_dir / "resume.log").read_text()
    (unbroken,) = run_suite(path, tmp_path / "unbroken", registry, console=quiet).summaries
    for key in ("val_loss", "test_loss", "train_flops", "layer_density", "sparsity_actual"):
        assert resumed[key] == unbroken[key]


# --------------------------------------------------------------------------------------------
# sys.exit in a hook, Ctrl-C in a hook, a full disk
# --------------------------------------------------------------------------------------------


class Exiter(Method):
    """Calls ``sys.exit(3)`` in ``update_mask`` at step 2 (a plugin that thinks it owns the process)."""

    name = "exiter"

    @hookimpl
    def update_mask(self, run, step, masks):
        if step == 2:
            sys.exit(3)


class CtrlCInHook(Method):
    """Raises KeyboardInterrupt in ``update_mask`` at step 2."""

    name = "ctrl_c_in_hook"

    @hookimpl
    def update_mask(self, run, step, masks):
        if step == 2:
            raise KeyboardInterrupt


def _cli_suite(tmp_path: Path, methods: list, steps: int = 4, **training) -> Path:
    suite = {**TINY_SUITE, "training": {**TINY_SUITE["training"], "steps": steps, **training}, "methods": methods}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def _invoke(path: Path, out: Path, registry):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sparsebench.runner.load_registry", lambda: registry)
        return CliRunner().invoke(app, ["run", str(path), "--out", str(out)])


def _summaries(suite_dir: Path) -> dict:
    return {s["label"]: s for s in map(json.loads, map(Path.read_text, suite_dir.glob("*/summary.json")))}


def test_sys_exit_in_a_hook_fails_that_run_only_naming_plugin_and_hook(tmp_path):
    path = _cli_suite(tmp_path, ["dense", "exiter", {"static": {"distribution": "erk"}}])
    result = _invoke(path, tmp_path / "out", registry_with(Exiter))
    assert result.exit_code == 1, result.output
    assert "1 run(s) failed" in result.output
    summaries = _summaries(tmp_path / "out" / "tiny")
    assert summaries["dense"]["status"] == "ok" and summaries["static"]["status"] == "ok"  # before and after it
    assert summaries["exiter"]["status"] == "failed"
    assert summaries["exiter"]["error"] == (
        "SystemExit: plugin 'exiter' raised SystemExit(3) in hook 'update_mask' (sys.exit ends the run, not the suite)"
    )
    log = (tmp_path / "out" / "tiny" / summaries["exiter"]["run_id"] / "error.log").read_text()
    assert log.startswith("Traceback") and "sys.exit(3)" in log


def test_ctrl_c_in_a_hook_still_stops_the_suite(tmp_path):
    path = _cli_suite(tmp_path, ["ctrl_c_in_hook", "dense"])
    with pytest.raises(KeyboardInterrupt):
        run_suite(path, tmp_path / "out", registry_with(CtrlCInHook), console=Console(quiet=True))
    assert _summaries(tmp_path / "out" / "tiny") == {}  # neither the interrupted run nor the next one


def _full_disk_from(target: str, writes_too: bool):
    """A torch.save that raises ENOSPC on the checkpoint named ``target``; ``writes_too``: from then on
    every atomic text write (summary, error.log, tables) fails as well."""
    real_save = torch.save
    full = {"now": False}

    def save(obj, f, *args, **kwargs):
        if f"{target}." in str(getattr(f, "name", f)) or full["now"]:
            full["now"] = writes_too
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    def write_text(path, text):
        if full["now"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(path, text)

    real_write_text = atomic_write_text
    return save, write_text


@pytest.mark.parametrize("writes_too", [False, True], ids=["checkpoint-only", "summary-too"])
def test_a_full_disk_keeps_the_last_checkpoint_fails_the_run_and_stops_the_suite(tmp_path, writes_too):
    path = _cli_suite(tmp_path, ["dense", {"static": {"distribution": "erk"}}], steps=6, checkpoint_every=2)
    out = tmp_path / "out"
    save, write_text = _full_disk_from("ckpt-00000004.pt", writes_too)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "save", save)
        for module in ("sparsebench.results", "sparsebench.failures"):
            mp.setattr(f"{module}.atomic_write_text", write_text)
        result = _invoke(path, out, registry_with())
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)  # typer's exit, no crash
    assert "failed: disk full: CheckpointWriteError" in result.output and "Stopped the suite: later runs would fail too" in result.output
    reason = ("disk full: CheckpointWriteError: ckpt-00000004.pt could not be written (No space left on device); "
              "the checkpoints before it are kept")
    suite_dir = out / "tiny"
    (run_dir,) = [p for p in suite_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]  # static never started
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]
    read_checkpoint(run_dir / "ckpt-00000002.pt")  # whole and verified
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "ckpt-00000004.pt.sha256").exists()
    if writes_too:  # nothing more could be written: the reason is printed, nothing torn is left
        assert not (run_dir / "summary.json").exists() and not (run_dir / "error.log").exists()
        assert f"Its summary.json could not be written: status failed, error: {reason}" in " ".join(result.output.split())
        assert "FAILED" in result.output  # the printed table, made in memory
    else:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed" and summary["error"] == reason
        assert "No space left on device" in (run_dir / "error.log").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.yaml"]  # nothing written outside --out

    again = _invoke(path, out, registry_with())  # space freed: the run resumes, the suite completes
    assert again.exit_code == 0, again.output
    assert "resumed from ckpt-00000002.pt" in (run_dir / "resume.log").read_text()
    assert {s["status"] for s in _summaries(suite_dir).values()} == {"ok"} and len(_summaries(suite_dir)) == 2


def test_an_out_folder_that_cannot_be_written_is_refused_in_one_line(tmp_path):
    path = _cli_suite(tmp_path, ["dense"])
    (tmp_path / "out").write_text("a file, not a folder")
    result = _invoke(path, tmp_path / "out", registry_with())
    assert result.exit_code == 2, result.output
    # the CLI checks --out before anything else (the runner's own check covers run_suite callers)
    assert result.output.strip().startswith("error: --out:") and "is a file, not a folder" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
