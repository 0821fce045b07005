"""Hugging Face-style DeepSpeed configs with "auto" values: resolved from the suite, or refused at validate."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sparsebench.cli import app
from sparsebench.config import DistributedConfig
from sparsebench.engines.deepspeed_config import check_runs, resolve_run_config
from sparsebench.errors import SparsebenchError
from tests.helpers import run_configs

HF_STYLE = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "allgather_bucket_size": 5e8},
}


def _runs(write_suite, registry, config, **training):
    path = write_suite(methods=["dense"], distributed={"backend": "deepspeed", "config": config},
                       training={"steps": 4, "batch_size": 8, "grad_clip": 0.5, **training})
    return run_configs(path, registry)


def test_auto_values_resolve_to_what_the_suite_says(write_suite, registry):
    (cfg,) = _runs(write_suite, registry, HF_STYLE)
    check_runs([cfg])  # validate: no int('auto') anywhere
    resolved = resolve_run_config(cfg, world=2)
    plain = resolve_run_config(cfg.model_copy(update={"distributed": DistributedConfig(backend="deepspeed", config={})}), world=2)
    assert resolved.training == plain.training  # batch from the suite, clip 0.5, float32 as the suite says


def test_an_auto_value_nothing_decides_is_refused_naming_its_key(write_suite, registry):
    (cfg,) = _runs(write_suite, registry, {**HF_STYLE, "zero_optimization": {"stage": "auto"}})
    with pytest.raises(SparsebenchError, match=r'zero_optimization\.stage is "auto", which the suite does not decide'):
        check_runs([cfg])


def test_validate_refuses_an_unresolvable_auto_in_one_line(write_suite, tmp_path):
    path = write_suite(methods=["dense"], distributed={"backend": "deepspeed", "config": {"communication_data_type": "auto"}})
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and 'communication_data_type is "auto"' in lines[0]
