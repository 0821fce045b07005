"""Checkpoint files: when they are written and pruned, what they hold, and how a damaged one is refused.

The reference run (module fixture) trains a method that draws from every random source and
keeps state that steers training, with dropout on, saving a checkpoint every 4 of 12 steps and
keeping all of them; tests copy some of its checkpoints into a fresh folder, damage them and
resume, which must end exactly where the reference ended.
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sparsebench import hookimpl
from sparsebench.checkpoints import Checkpointer, CheckpointError, checkpoint_name, digest_path, list_checkpoints
from sparsebench.checkpoints.state import check_loadable
from sparsebench.errors import PluginError
from sparsebench.loop import train
from sparsebench.masks import random_masks, uniform_densities
from sparsebench.methods import Method
from sparsebench.run_setup import setup_run
from tests.conftest import TINY_SUITE
from tests.helpers import registry_with, run_configs

STEPS, EVERY = 12, 4


class Churn(Method):
    """Draws from every random source and keeps state that steers training.

    A resume that missed any of torch/numpy/python RNG, ``run.generator``, the held-out pool
    position, the data order or this plugin's own state would end with different numbers.
    """

    name = "churn"

    def __init__(self, config=None):
        super().__init__(config)
        self.updates = 0
        self.scores: dict[str, torch.Tensor] = {}

    @hookimpl
    def configure(self, run):
        self.scores = {n: torch.zeros_like(p) for n, p in run.sparsifiable.items()}

    @hookimpl
    def init_mask(self, run, model):
        return random_masks(run.layers, uniform_densities(run.layers, run.sparsity), run.generator)

    @hookimpl
    def loss_terms(self, run, step, batch, outputs):
        return {"churn": outputs.logits.float().pow(2).mean() * 1e-3 * (1 + self.updates)}

    @hookimpl
    def update_mask(self, run, step, masks):
        for name, p in run.sparsifiable.items():
            self.scores[name] += p.grad.abs()
        if step % 3:
            return None
        with torch.no_grad():
            heldout_logit = float(run.model(input_ids=run.heldout.next()["input_ids"]).logits.mean())
        k = 1 + int(random.random() * 3) + int(np.random.rand() * 3) + int(torch.rand(1) * 3)
        run.log(**{"churn/k": k, "churn/heldout_logit": heldout_logit})
        self.updates += 1
        new = {}
        for name, mask in masks.items():
            flat = mask.clone().view(-1)
            active = torch.nonzero(flat).view(-1)
            drop = active[torch.randperm(len(active), generator=run.generator)[:k]]
            score = self.scores[name].view(-1).masked_fill(flat, -1.0)
            grow = torch.topk(score, k).indices
            flat[drop], flat[grow] = False, True
            new[name] = flat.view_as(mask)
        return new

    def state_dict(self):
        return {"updates": self.updates, "scores": self.scores}

    def load_state_dict(self, state):
        self.updates = int(state["updates"])
        self.scores = {n: t.clone() for n, t in state["scores"].items()}


def churn_suite(path: Path, **training) -> Path:
    suite = {
        **TINY_SUITE,
        "model": {**TINY_SUITE["model"], "resid_pdrop": 0.1},  # dropout draws from torch's global RNG
        "training": {**TINY_SUITE["training"], "steps": STEPS, "checkpoint_every": EVERY, "keep_checkpoints": 10,
                     "eval_every": 5, "log_every": 1, **training},
        "methods": ["churn"],
    }
    path.write_text(yaml.safe_dump(suite))
    return path


def train_in(cfg, registry, run_dir: Path, resume: bool, observers=()):
    """Train ``cfg`` into ``run_dir``; returns (setup, loop result, resume messages)."""
    messages: list[str] = []
    run_dir.mkdir(parents=True, exist_ok=True)
    setup = setup_run(cfg, registry, run_dir, observers)
    try:
        return setup, train(setup, checkpoints=Checkpointer(setup, resume=resume, notify=messages.append)), messages
    finally:
        setup.run.metrics.close()


def metrics_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its wall-time field."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def final_state(setup, result) -> dict:
    run = setup.run
    return {
        "val_loss": result.val_loss,
        "test_loss": result.test_loss,
        "params": {k: v.clone() for k, v in run.model.state_dict().items()},
        "masks": {k: v.clone() for k, v in run.masks.items()},
        "initial_masks": result.initial_masks,
        "ledger": run.ledger.state_dict(),
        "churn": run.plugins["churn"].state_dict(),
        "step": run.step,
    }


def assert_same_final_state(got: dict, want: dict) -> None:
    assert got["step"] == want["step"]
    assert got["val_loss"] == want["val_loss"] and got["test_loss"] == want["test_loss"]
    assert got["ledger"] == want["ledger"]
    for key in ("params", "masks", "initial_masks"):
        assert got[key].keys() == want[key].keys()
        for name in want[key]:
            assert torch.equal(got[key][name], want[key][name]), f"{key}[{name}] differs"
    assert got["churn"]["updates"] == want["churn"]["updates"]
    for name, score in want["churn"]["scores"].items():
        assert torch.equal(got["churn"]["scores"][name], score)


class Reference:
    def __init__(self, root: Path, registry, cfg, run_dir: Path, state: dict):
        self.root, self.registry, self.cfg, self.run_dir, self.state = root, registry, cfg, run_dir, state

    def copy(self, dest: Path, steps: list[int]) -> Path:
        """A run folder as a kill after the last of ``steps`` leaves it: those checkpoints and the
        whole metrics.jsonl (lines written after the checkpoint included)."""
        dest.mkdir(parents=True)
        shutil.copy(self.run_dir / "metrics.jsonl", dest / "metrics.jsonl")
        for step in steps:
            path = self.run_dir / checkpoint_name(step)
            shutil.copy(path, dest / path.name)
            shutil.copy(digest_path(path), dest / digest_path(path).name)
        return dest


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before conftest's per-test cache
        mp.setenv("SPARSEBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "sparsebench-cache"))
        registry = registry_with(Churn)
        (cfg,) = run_configs(churn_suite(root / "churn.yaml"), registry)
        run_dir = root / "run"
        setup, result, _ = train_in(cfg, registry, run_dir, resume=False)
    return Reference(root, registry, cfg, run_dir, final_state(setup, result))


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def test_checkpoints_are_written_every_n_steps_and_at_the_end(reference):
    steps = [s for s, _ in list_checkpoints(reference.run_dir)]
    assert steps == [12, 8, 4]
    for _, path in list_checkpoints(reference.run_dir):
        assert digest_path(path).read_text().split()[0] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_only_the_newest_keep_checkpoints_remain(write_suite, tmp_path):
    registry = registry_with(Churn)
    training = {**TINY_SUITE["training"], "steps": 7, "checkpoint_every": 3, "keep_checkpoints": 2}
    (cfg,) = run_configs(write_suite(methods=["churn"], training=training), registry)
    train_in(cfg, registry, tmp_path / "run", resume=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [7, 6]
    assert sorted(p.name for p in (tmp_path / "run").glob("*.sha256")) == ["ckpt-00000006.pt.sha256", "ckpt-00000007.pt.sha256"]


def test_checkpoint_every_zero_writes_only_the_final_checkpoint(write_suite, tmp_path):
    registry = registry_with(Churn)
    training = {**TINY_SUITE["training"], "steps": 5, "checkpoint_every": 0}
    (cfg,) = run_configs(write_suite(methods=["churn"], training=training), registry)
    train_in(cfg, registry, tmp_path / "run", resume=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [5]


def test_a_checkpoint_holds_every_state_and_loads_as_pure_data(reference):
    state = torch.load(reference.run_dir / checkpoint_name(8), weights_only=True)
    assert state["step"] == 8 and state["run_id"] == reference.cfg.run_id
    assert set(state["rng"]) >= {"torch", "numpy", "python", "run_generator", "sampler", "heldout"}
    assert state["rng"]["heldout"]["position"] == 2  # Churn drew one held-out batch at steps 3 and 6
    assert set(state["plugins"]) == {"churn"} and state["plugins"]["churn"]["updates"] == 2
    assert set(state["masks"]) == set(state["initial_masks"]) == set(reference.state["masks"])
    assert state["ledger"]["steps"] == 8
    assert state["optimizer"]["state"]  # Adam moments
    # metrics.jsonl had exactly the records of steps 1..8 when the checkpoint was written
    lines = (reference.run_dir / "metrics.jsonl").read_bytes()[: state["metrics_offset"]].decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))


def test_a_fresh_start_discards_old_checkpoints_and_metrics(reference, tmp_path):
    run_dir = reference.copy(tmp_path / "run", [4, 8])
    setup, result, messages = train_in(reference.cfg, reference.registry, run_dir, resume=False)
    assert messages == []
    assert_same_final_state(final_state(setup, result), reference.state)
    assert metrics_records(run_dir) == metrics_records(reference.run_dir)


# --------------------------------------------------------------------------------------------
# damaged checkpoints
# --------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this would create the marker file: weights-only loading must never do it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _rewrite(path: Path, state: dict) -> None:
    """Save ``state`` over ``path`` with a valid checksum (only the content is wrong)."""
    torch.save(state, path)
    digest_path(path).write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")


def _truncate(path: Path, tmp_path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path, tmp_path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside tensor data: torch.load alone would not notice
    path.write_bytes(bytes(data))


def _drop_checksum(path: Path, tmp_path: Path) -> None:
    digest_path(path).unlink()


def _hold_code(path: Path, tmp_path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["plugins"]["churn"]["payload"] = Payload(tmp_path / "payload-ran")
    _rewrite(path, state)


def _other_run(path: Path, tmp_path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["run_id"] = "someone-else"
    _rewrite(path, state)


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "checksum mismatch"),
    (_flip_a_byte, "checksum mismatch"),
    (_drop_checksum, "checksum file ckpt-00000008.pt.sha256 is missing"),
    (_hold_code, "refused by torch.load(weights_only=True)"),
    (_other_run, "written by run 'someone-else'"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, damage, reason):
    run_dir = reference.copy(tmp_path / "run", [4, 8])
    damage(run_dir / checkpoint_name(8), tmp_path)
    setup, result, messages = train_in(reference.cfg, reference.registry, run_dir, resume=True)
    assert len(messages) == 2, messages
    assert "ckpt-00000008.pt" in messages[0] and reason in messages[0]
    assert messages[0].endswith("falling back to ckpt-00000004.pt")
    assert "resumed from ckpt-00000004.pt (step 4 of 12)" in messages[1]
    assert not (tmp_path / "payload-ran").exists()
    assert_same_final_state(final_state(setup, result), reference.state)
    assert metrics_records(run_dir) == metrics_records(reference.run_dir)
    log = (run_dir / "resume.log").read_text()
    assert reason in log and "resumed from ckpt-00000004.pt" in log


def test_no_usable_checkpoint_restarts_from_scratch_and_says_so(reference, tmp_path):
    run_dir = reference.copy(tmp_path / "run", [4, 8])
    _flip_a_byte(run_dir / checkpoint_name(8), tmp_path)
    _truncate(run_dir / checkpoint_name(4), tmp_path)
    setup, result, messages = train_in(reference.cfg, reference.registry, run_dir, resume=True)
    assert messages[1].endswith("starting from scratch") and len(messages) == 2
    assert_same_final_state(final_state(setup, result), reference.state)
    assert metrics_records(run_dir) == metrics_records(reference.run_dir)  # the stale log was emptied
    assert [s for s, _ in list_checkpoints(run_dir)] == [12, 8, 4]  # damaged files replaced by good ones


def test_the_checkpoint_reader_gives_one_line_errors(reference, tmp_path):
    from sparsebench.checkpoints import read_checkpoint

    path = tmp_path / checkpoint_name(8)
    shutil.copy(reference.run_dir / path.name, path)
    shutil.copy(digest_path(reference.run_dir / path.name), digest_path(path))
    assert read_checkpoint(path)["step"] == 8
    _truncate(path, tmp_path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(err.value) == "ckpt-00000008.pt: checksum mismatch (the file is truncated or corrupt)"


# --------------------------------------------------------------------------------------------
# what plugins may put in their state
# --------------------------------------------------------------------------------------------


LOADABLE = [
    torch.ones(3), torch.nn.Parameter(torch.ones(2)), 1, 2.5, True, None, "x", b"raw", 1 + 2j, torch.float16,
    torch.device("cpu"), [1, (2, 3)], {"a": {1: torch.zeros(1)}}, collections.OrderedDict(a=1), torch.Size([2, 3]),
    random.getstate(), torch.Generator().get_state(), {1, 2},
]
NOT_LOADABLE = [
    np.zeros(3), np.float64(1.0), np.int64(3), collections.defaultdict(int), frozenset({1}), object(), Path("x"),
    {"nested": [np.float32(1.0)]},
]


@pytest.mark.parametrize("value", LOADABLE + NOT_LOADABLE, ids=lambda v: type(v).__name__)
def test_check_loadable_agrees_with_weights_only_loading(value, tmp_path):
    path = tmp_path / "value.pt"
    torch.save({"v": value}, path)
    try:
        torch.load(path, weights_only=True)
        loads = True
    except Exception:
        loads = False
    try:
        check_loadable(value, "state")
        accepted = True
    except CheckpointError:
        accepted = False
    assert accepted == loads
    assert accepted == any(value is v for v in LOADABLE)


class NumpyState(Method):
    """Keeps its state in a numpy array: a checkpoint of it could not be loaded as pure data."""

    name = "numpy_state"

    def state_dict(self):
        return {"counts": {"steps": np.zeros(3)}}


def test_a_plugin_state_weights_only_cannot_load_fails_the_run_naming_the_plugin(write_suite, tmp_path):
    registry = registry_with(NumpyState)
    training = {**TINY_SUITE["training"], "steps": 4, "checkpoint_every": 2}
    (cfg,) = run_configs(write_suite(methods=["numpy_state"], training=training), registry)
    with pytest.raises(PluginError) as err:
        train_in(cfg, registry, tmp_path / "run", resume=False)
    assert str(err.value) == (
        "plugin 'numpy_state': state_dict()['counts']['steps']: a numpy.ndarray cannot be loaded with "
        "torch.load(weights_only=True); use tensors, numbers, strings, lists, tuples and dicts"
    )
    assert list_checkpoints(tmp_path / "run") == []  # nothing half-written
    assert not list((tmp_path / "run").glob(".*.tmp"))
