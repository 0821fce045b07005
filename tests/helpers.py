"""Small utilities shared by tests (not fixtures)."""

from __future__ import annotations

import types
from pathlib import Path

import torch

from sparsebench.loop import train
from sparsebench.registry import load_registry
from sparsebench.run_setup import setup_run
from sparsebench.suites import expand_suite


def registry_with(*classes):
    """The installed methods plus ``classes``, registered as a package named 'tests'."""
    module = types.ModuleType("test_plugins")
    module.register_methods = lambda register: [register(c) for c in classes]
    return load_registry(extra_modules=[(module, "tests 0")])


def run_configs(path: Path, registry, **overrides):
    return expand_suite(path, registry, overrides or None)[1]


def train_config(cfg, registry, out_dir=None, observers=()):
    setup = setup_run(cfg, registry, out_dir, observers)
    try:
        return setup, train(setup)
    finally:
        setup.run.metrics.close()


def swap_first_pair(masks: dict) -> dict:
    """Every mask with its first pruned position regrown and its first active one pruned (counts kept)."""
    new = {}
    for name, mask in masks.items():
        flat = mask.clone().view(-1)
        off, on = int(torch.nonzero(~flat)[0]), int(torch.nonzero(flat)[0])
        flat[off], flat[on] = True, False
        new[name] = flat.view_as(mask)
    return new
