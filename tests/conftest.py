"""Shared fixtures: tiny suites on tiny synthetic data, written to a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

TINY_SUITE = {
    "name": "tiny",
    "data": {
        "dataset": "synthetic",
        "seq_len": 16,
        "synthetic": {"vocab_size": 32, "branching": 4, "train_tokens": 40_000, "valid_tokens": 4_096, "test_tokens": 4_096},
    },
    "model": {"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32},
    "training": {"steps": 20, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 10,
                 "eval_batches": 2, "log_every": 5, "device": "cpu"},
    "sparsity": 0.8,
    "methods": ["dense", {"static": {"distribution": "erk"}}],
    "seeds": [0],
}


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from threads, and spinning ones cost a lot on a busy machine."""
    from sparsebench.conformance import single_thread

    with single_thread():
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test session tokenises into its own cache, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "sparsebench-cache"
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(cache))


@pytest.fixture
def write_suite(tmp_path):
    """``write_suite(**overrides)`` writes a tiny suite (overrides replace top-level keys)."""

    def write(name: str = "tiny.yaml", **overrides) -> Path:
        suite = {**TINY_SUITE, **overrides}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(suite, sort_keys=False))
        return path

    return write


@pytest.fixture
def registry():
    from sparsebench.registry import load_registry

    return load_registry()
