"""Checkpoints with a valid checksum but the wrong contents, or a folder where a checkpoint belongs:
refused in one line and fallen back from, as a corrupt file is."""

from __future__ import annotations

import pytest
import torch

from sparsebench.checkpoints import checkpoint_name, list_checkpoints, write_checkpoint
from tests.resume.test_checkpoint import assert_same_final_state, final_state, metrics_records, reference, train_in  # noqa: F401


def _set(key, value):
    def damage(state):
        state[key] = value
    return damage


def _drop_a_weight(state):
    state["model"].pop(next(iter(state["model"])))


def _masks_as_floats(state):
    state["masks"] = {n: m.float() for n, m in state["masks"].items()}


def _moments_of_the_wrong_shape(state):
    entry = next(iter(state["optimizer"]["state"].values()))
    entry["exp_avg"] = torch.zeros(3)


def _drop_the_rng(state):
    del state["rng"]["torch"]


@pytest.mark.parametrize("damage, reason", [
    (_set("step", "abc"), "its step 'abc' is not a whole number in 0..12"),
    (_set("step", 99), "its step 99 is not a whole number in 0..12"),
    (_set("optimizer", {}), "its optimizer state is not an optimizer's state_dict"),
    (_moments_of_the_wrong_shape, "its optimizer state 'exp_avg' of parameter"),
    (_set("model", 5), "its model weights: a int, not a mapping of tensors"),
    (_drop_a_weight, "its model weights do not match this run's"),
    (_masks_as_floats, "is torch.float32, not a boolean mask"),
    (_set("plugins", [1]), "its plugin states are not a mapping"),
    (_drop_the_rng, "its random states are incomplete"),
    (_set("ledger", {}), "its FLOPs ledger is incomplete"),
    (_set("metrics_offset", -1), "its metrics_offset -1 is not a whole number"),
])
def test_a_well_checksummed_checkpoint_of_the_wrong_structure_falls_back(reference, tmp_path, damage, reason):
    run_dir = reference.copy(tmp_path / "run", [4, 8])
    path = run_dir / checkpoint_name(8)
    state = torch.load(path, weights_only=True)
    damage(state)
    write_checkpoint(path, state)  # the project's own writer: the checksum is valid
    setup, result, messages = train_in(reference.cfg, reference.registry, run_dir, resume=True)
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"{reference.cfg.run_id}: ckpt-00000008.pt: ") and reason in messages[0], messages[0]
    assert messages[0].endswith("falling back to ckpt-00000004.pt") and "\n" not in messages[0]
    assert "resumed from ckpt-00000004.pt (step 4 of 12)" in messages[1]
    assert_same_final_state(final_state(setup, result), reference.state)
    assert metrics_records(run_dir) == metrics_records(reference.run_dir)


def test_a_folder_where_the_newest_checkpoint_belongs_falls_back(reference, tmp_path):
    run_dir = reference.copy(tmp_path / "run", [4])
    folder = run_dir / checkpoint_name(8)
    (folder / "inside").mkdir(parents=True)
    (run_dir / (folder.name + ".sha256")).mkdir()  # and one where its checksum belongs
    setup, result, messages = train_in(reference.cfg, reference.registry, run_dir, resume=True)
    assert messages[0].endswith("ckpt-00000008.pt: not a file; falling back to ckpt-00000004.pt"), messages
    assert_same_final_state(final_state(setup, result), reference.state)
    assert [s for s, _ in list_checkpoints(run_dir)] == [12, 8, 4]
    assert (run_dir / checkpoint_name(8)).is_file()


def test_a_checkpoint_that_fails_while_applied_is_removed_so_the_next_attempt_falls_back(reference, tmp_path, monkeypatch):
    from sparsebench.checkpoints import CheckpointError
    from sparsebench.checkpoints import checkpointer

    run_dir = reference.copy(tmp_path / "run", [4, 8])

    def broken(setup, state):
        raise ValueError("unforeseen\nsecond line")

    monkeypatch.setattr(checkpointer, "apply_checkpoint", broken)
    with pytest.raises(CheckpointError, match=r"^ckpt-00000008.pt: could not be applied \(ValueError: unforeseen\); "):
        train_in(reference.cfg, reference.registry, run_dir, resume=True)
    assert [s for s, _ in list_checkpoints(run_dir)] == [4]
