"""Suite files: expansion, sweeps, and every kind of bad input refused before training."""

from __future__ import annotations

import pytest
import yaml

from sparsebench.errors import SuiteError
from sparsebench.suites import expand_suite


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
