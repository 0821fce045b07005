"""Suite files: expansion, sweeps, and every kind of bad input refused before training."""

from __future__ import annotations

import pytest
import yaml

from sparsebench.errors import SuiteError
from sparsebench.suites import expand_suite
from tests.conftest import TINY_SUITE as TINY


def test_sweep_expands_cartesian_product_times_methods_times_seeds(write_suite, registry):
    path = write_suite(
        methods=[{"static": {"distribution": "uniform", "label": "uniform"}}, {"static": {"distribution": "erk", "label": "erk"}}],
        seeds=[0, 1],
        sweep={"sparsity": [0.5, 0.9], "training.lr": [1e-3, 3e-3]},
    )
    _, runs = expand_suite(path, registry)
    assert len(runs) == 2 * 2 * 2 * 2
    assert {r.sparsity for r in runs} == {0.5, 0.9}
    assert {r.training.lr for r in runs} == {1e-3, 3e-3}
    assert len({r.run_id for r in runs}) == len(runs)


def test_dense_runs_once_when_sparsity_is_swept(write_suite, registry):
    path = write_suite(methods=["dense", "static"], sweep={"sparsity": [0.5, 0.8, 0.9]})
    _, runs = expand_suite(path, registry)
    assert [r.method.name for r in runs].count("dense") == 1
    assert [r.method.name for r in runs].count("static") == 3


def test_run_id_changes_with_any_config_value(write_suite, registry):
    a = expand_suite(write_suite("a.yaml"), registry)[1][1]
    b = expand_suite(write_suite("b.yaml", training={**yaml.safe_load(write_suite().read_text())["training"], "lr": 1e-4}), registry)[1][1]
    assert a.run_id != b.run_id


def test_method_options_are_resolved_with_defaults(write_suite, registry):
    _, runs = expand_suite(write_suite(methods=[{"static": {"distribution": "uniform"}}]), registry)
    assert runs[0].method.config == {"distribution": "uniform", "erk_power_scale": 1.0}


def test_include_merges_a_base_suite(tmp_path, write_suite, registry):
    base = write_suite("base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"include": base.name, "name": "child", "sparsity": 0.5}))
    suite, runs = expand_suite(child, registry)
    assert suite.name == "child" and {r.sparsity for r in runs} == {0.0, 0.5}


def _error(path, registry) -> str:
    with pytest.raises(SuiteError) as info:
        expand_suite(path, registry)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_malformed_yaml_names_file_and_line(tmp_path, registry):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nmethods:\n  - dense\n  training: {steps: 3\n")
    message = _error(path, registry)
    assert str(path) in message and "line" in message


def test_unknown_top_level_key_lists_allowed_keys(write_suite, registry):
    message = _error(write_suite(trainig={"steps": 3}), registry)
    assert "trainig" in message and "Did you mean 'training'" in message and "methods" in message


def test_unknown_training_key_names_key_path_and_allowed(write_suite, registry):
    message = _error(write_suite(training={"stepz": 3}), registry)
    assert "training.stepz" in message and "Allowed:" in message and "steps" in message


def test_unknown_method_suggests_the_closest_name(write_suite, registry):
    message = _error(write_suite(methods=["statik"]), registry)
    assert "methods[0]" in message and "Did you mean 'static'" in message and "dense" in message


def test_unknown_method_option_lists_the_options(write_suite, registry):
    message = _error(write_suite(methods=[{"static": {"distrib": "erk"}}]), registry)
    assert "static.distrib" in message and "distribution" in message


def test_invalid_method_option_value_names_allowed_values(write_suite, registry):
    message = _error(write_suite(methods=[{"static": {"distribution": "gaussian"}}]), registry)
    assert "static.distribution" in message and "'uniform'" in message and "'erk'" in message


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_impossible_sparsity_is_refused(write_suite, registry, sparsity):
    message = _error(write_suite(sparsity=sparsity), registry)
    assert "sparsity" in message


def test_impossible_swept_sparsity_names_the_sweep_value(write_suite, registry):
    message = _error(write_suite(sweep={"sparsity": [0.5, 1.0]}), registry)
    assert "sparsity=1.0" in message


@pytest.mark.parametrize("key,value", [("steps", 0), ("batch_size", -2), ("steps", -5)])
def test_non_positive_steps_or_batch_size_are_refused(write_suite, registry, key, value):
    training = {"steps": 10, "batch_size": 2, key: value}
    message = _error(write_suite(training=training), registry)
    assert f"training.{key}" in message


def test_missing_data_file_names_the_key_and_path(write_suite, registry, tmp_path):
    missing = tmp_path / "nope.txt"
    message = _error(write_suite(data={"dataset": "text", "tokenizer": "char", "file": str(missing)}), registry)
    assert "data.file" in message and "nope.txt" in message


def test_unknown_model_preset_is_refused_with_presets_listed(write_suite, registry):
    message = _error(write_suite(model="gpt-nanoo"), registry)
    assert "model" in message and "gpt-nano" in message


def test_empty_methods_is_refused(write_suite, registry):
    assert "methods" in _error(write_suite(methods=[]), registry)


def test_relative_deepspeed_config_path_is_read_from_the_suite_folder(write_suite, registry, tmp_path):
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 1}}')
    _, runs = expand_suite(write_suite(distributed={"backend": "deepspeed", "config": "ds.json"}), registry)
    assert runs[0].distributed.config == (tmp_path / "ds.json").resolve()


def test_missing_deepspeed_config_file_is_refused(write_suite, registry):
    message = _error(write_suite(distributed={"backend": "deepspeed", "config": "nope.json"}), registry)
    assert "distributed.config" in message and "nope.json" in message


# --------------------------------------------------------------------------------------------
# a training budget per method (issue 10 §6)
# --------------------------------------------------------------------------------------------


def test_method_entry_training_override_gives_its_own_steps_and_run_id(write_suite, registry):
    path = write_suite(methods=[{"rigl": {"label": "rigl-1x"}}, {"rigl": {"label": "rigl-2x", "training": {"steps": 40}}}])
    _, runs = expand_suite(path, registry)
    by_label = {r.method.display: r for r in runs}
    assert by_label["rigl-1x"].training.steps == 20 and by_label["rigl-2x"].training.steps == 40
    assert by_label["rigl-1x"].run_id != by_label["rigl-2x"].run_id
    assert by_label["rigl-2x"].training.lr == by_label["rigl-1x"].training.lr  # only the overridden key changes


def test_method_training_override_wins_over_a_swept_training_key(write_suite, registry):
    path = write_suite(methods=["dense", {"static": {"training": {"steps": 7}}}], sweep={"training.steps": [10, 30]})
    _, runs = expand_suite(path, registry)
    assert sorted(r.training.steps for r in runs if r.method.name == "dense") == [10, 30]
    assert {r.training.steps for r in runs if r.method.name == "static"} == {7}
    assert len([r for r in runs if r.method.name == "static"]) == 1  # both sweep points are one run


def test_overriding_runs_schedules_follow_their_own_step_count(write_suite, registry):
    """Plugins read run.total_steps: it is the entry's own budget, not the suite's."""
    from sparsebench.run_setup import setup_run

    _, runs = expand_suite(write_suite(methods=[{"rigl": {"training": {"steps": 40, "warmup_steps": 4}}}]), registry)
    run = setup_run(runs[0], registry).run
    assert run.total_steps == 40 and run.config.training.steps == 40 and run.config.training.warmup_steps == 4


def test_overriding_run_trains_its_own_number_of_steps(write_suite, registry, tmp_path):
    import json

    from sparsebench.runner import run_suite

    path = write_suite(training={**TINY["training"], "steps": 6, "warmup_steps": 0, "eval_every": 0},
                       methods=["dense", {"dense": {"label": "dense-4", "training": {"steps": 4}}}])
    outcome = run_suite(path, tmp_path / "out", registry=registry)
    steps = {s["run_id"].split("-s0-")[0]: s["steps"] for s in outcome.summaries}
    assert steps == {"dense": 6, "dense-4": 4}
    for summary in outcome.summaries:
        records = (tmp_path / "out" / "tiny" / summary["run_id"] / "metrics.jsonl").read_text().splitlines()
        assert max(json.loads(r).get("step", 0) for r in records) == summary["steps"]


# --------------------------------------------------------------------------------------------
# run identity: what only observes never changes it (issue 11 §4)
# --------------------------------------------------------------------------------------------


class _Logger:
    """A stand-in for a logger plugin: an observer with an option."""

    from pydantic import BaseModel

    class Config(BaseModel):
        project: str = "p"

    name = "test_logger"
    observer = True

    def __init__(self, config):
        self.config = config


@pytest.fixture
def registry_with_logger():
    from sparsebench.registry import load_registry

    registry = load_registry()
    registry.register(_Logger, "tests")
    return registry


def _ids(path, registry, overrides=None):
    return [r.run_id for r in expand_suite(path, registry, overrides)[1]]


def test_observer_plugins_and_log_cadence_do_not_change_run_ids(write_suite, registry_with_logger):
    base = _ids(write_suite("a.yaml"), registry_with_logger)
    assert _ids(write_suite("b.yaml", plugins=[{"test_logger": {"project": "x"}}]), registry_with_logger) == base
    for key, value in (("log_every", 1), ("checkpoint_every", 3), ("keep_checkpoints", 2)):
        assert _ids(write_suite("c.yaml"), registry_with_logger, {f"training.{key}": value}) == base


def test_a_plugin_that_trains_changes_run_ids(write_suite, registry):
    assert _ids(write_suite("a.yaml"), registry) != _ids(write_suite("b.yaml", plugins=["ema_distill"]), registry)


def test_observer_stays_in_the_runs_config(write_suite, registry_with_logger):
    _, runs = expand_suite(write_suite(plugins=["test_logger"]), registry_with_logger)
    assert all([p.name for p in r.plugins] == ["test_logger"] for r in runs)


def test_adding_a_logger_or_changing_log_every_retrains_nothing(write_suite, registry_with_logger, tmp_path):
    from typer.testing import CliRunner

    from sparsebench.cli import app
    from sparsebench.runner import run_suite

    training = {**TINY["training"], "steps": 4, "warmup_steps": 0, "eval_every": 0}
    path = write_suite(training=training, methods=["dense"])
    out = tmp_path / "out"
    assert run_suite(path, out, registry=registry_with_logger).skipped == 0
    with_logger = write_suite("logged.yaml", training={**training, "log_every": 1}, methods=["dense"], plugins=["test_logger"])
    assert run_suite(with_logger, out, registry=registry_with_logger).skipped == 1
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--set", "training.log_every=2"])
    assert result.exit_code == 0, result.output
    assert "1 run(s) already had results and were skipped" in result.output
    assert len([p for p in (out / "tiny").iterdir() if p.is_dir()]) == 1


# --------------------------------------------------------------------------------------------
# labels and model names (issue 11 §1), held-out batches (issue 12 §6)
# --------------------------------------------------------------------------------------------


def test_identical_entries_under_one_label_are_one_run(write_suite, registry):
    _, runs = expand_suite(write_suite(methods=["dense", "static", "static"]), registry)
    assert [r.method.name for r in runs] == ["dense", "static"]


@pytest.mark.parametrize("model,label", [
    ("gpt-nano", "gpt-nano"),
    ({"family": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 128}, "gpt2-2L-4H-128d"),
    ({"family": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 128, "n_inner": 256}, "gpt2-2L-4H-128d-256ff"),
    ({"preset": "gpt-nano", "n_layer": 3}, "gpt2-3L-4H-96d"),
    ({"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "n_inner": 192}, "llama-2L-4H-2KV-64d-192ff"),
    ({"family": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
      "intermediate_size": 128}, "llama-2L-4H-4KV-64d-128ff"),
    ({"pretrained": "/models/my-gpt2/"}, "my-gpt2"),
])
def test_model_mapping_is_named_by_its_shape(model, label):
    from sparsebench.suite_checks import model_label

    assert model_label(model) == label


def test_run_ids_name_the_model_shape(write_suite, registry):
    _, runs = expand_suite(write_suite(sweep={"model.n_layer": [1, 2]}), registry)
    assert {r.run_id.split("-seed")[0].split("-s0.8-")[-1] for r in runs if r.method.name == "static"} == {
        "gpt2-1L-2H-32d", "gpt2-2L-2H-32d"}


class _Scorer:
    """A method that scores masks on held-out batches, as SparsAE does."""

    from pydantic import BaseModel

    class Config(BaseModel):
        pass

    name = "test_scorer"
    min_heldout_batches = 2

    def __init__(self, config):
        self.config = config


@pytest.fixture
def registry_with_scorer():
    from sparsebench.registry import load_registry

    registry = load_registry()
    registry.register(_Scorer, "tests")
    return registry


def test_heldout_fraction_zero_is_blamed_for_a_method_that_needs_heldout_batches(write_suite, registry_with_scorer):
    data = {**TINY["data"], "heldout_fraction": 0}
    message = _error(write_suite(data=data, methods=["test_scorer"]), registry_with_scorer)
    assert "data.heldout_fraction is 0" in message and "test_scorer" in message
    tiny_pool = {**TINY["data"], "heldout_fraction": 0.0001}  # 4 tokens of 40k: not one window
    assert "raise data.heldout_fraction" in _error(write_suite(data=tiny_pool, methods=["test_scorer"]), registry_with_scorer)
    few = {**TINY["training"], "heldout_batches": 1}
    assert "training.heldout_batches is 1" in _error(write_suite(training=few, methods=["test_scorer"]), registry_with_scorer)
    expand_suite(write_suite(data=data, methods=["static"]), registry_with_scorer)  # others do not need the pool
