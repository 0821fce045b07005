"""The plugin contract: entry-point loading, third-party packages, duplicates, tracing, hookspecs."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import yaml

from sparsebench import hookspecs
from sparsebench.errors import HookError, PluginError
from sparsebench.hooks import Hooks, make_plugin_manager
from sparsebench.methods import Method
from sparsebench.registry import load_registry
from tests.conftest import TINY_SUITE

THIRD_PARTY_METHOD = '''
"""A third-party method written only against the documented contract."""
import torch
from pydantic import BaseModel
from sparsebench import hookimpl


class Options(BaseModel):
    keep_first: bool = True


class FirstHalf:
    name = "first_half"
    Config = Options

    def __init__(self, config):
        self.config = config
        self.updates = 0

    @hookimpl
    def init_mask(self, run, model):
        masks = {}
        for name, p in run.sparsifiable.items():
            m = torch.zeros(p.numel(), dtype=torch.bool)
            m[: p.numel() // 2] = self.config.keep_first
            m[p.numel() // 2 :] = not self.config.keep_first
            masks[name] = m.view_as(p)
        return masks

    @hookimpl
    def on_run_end(self, run, summary):
        return {"first_half_steps": run.step, "first_half_density": run.density(next(iter(run.masks)))}

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, state):
        self.updates = state["updates"]


def register_methods(register):
    register(FirstHalf)
'''


def _build_package(root: Path) -> Path:
    """Write, build and install (into ``root/site``) a package exposing a ``sparsebench`` entry point."""
    src = root / "src"
    (src / "firsthalf_sb").mkdir(parents=True)
    (src / "firsthalf_sb" / "__init__.py").write_text(THIRD_PARTY_METHOD)
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "firsthalf-sb"
        version = "0.3.1"
        [project.entry-points.sparsebench]
        firsthalf = "firsthalf_sb"
        [tool.setuptools]
        packages = ["firsthalf_sb"]
    '''))
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(src)],
        check=True, capture_output=True, text=True,
    )
    return site


def test_third_party_package_registered_by_entry_point_runs_in_a_suite(tmp_path):
    site = _build_package(tmp_path)
    suite = {**TINY_SUITE, "name": "third", "methods": ["first_half"],
             "training": {**TINY_SUITE["training"], "steps": 4, "eval_every": 0}}
    path = tmp_path / "third.yaml"
    path.write_text(yaml.safe_dump(suite))
    env = {**os.environ, "PYTHONPATH": str(site)}
    listing = subprocess.run([sys.executable, "-m", "sparsebench", "methods"], env=env,
                             capture_output=True, text=True, check=True)
    assert "first_half" in listing.stdout and "firsthalf-sb 0.3.1" in listing.stdout
    subprocess.run([sys.executable, "-m", "sparsebench", "run", str(path), "--out", str(tmp_path / "out")],
                   env=env, capture_output=True, text=True, check=True)
    summary = json.loads(next((tmp_path / "out" / "third").glob("*/summary.json")).read_text())
    assert summary["status"] == "ok" and summary["method"] == "first_half"
    assert summary["first_half_steps"] == 4 and summary["first_half_density"] == 0.5
    assert summary["sparsity_actual"] == pytest.approx(0.5, abs=1e-3)


def test_first_party_methods_come_from_the_entry_point_group(registry):
    assert {"dense", "static"} <= set(registry.names())
    assert registry.entries["static"].package.startswith("sparsebench ")


class Twin(Method):
    name = "static"


def test_duplicate_method_name_is_refused_naming_both_packages():
    module = types.ModuleType("twin")
    module.register_methods = lambda register: register(Twin)
    with pytest.raises(PluginError) as info:
        load_registry(extra_modules=[(module, "twin-pkg 1.0")])
    assert "static" in str(info.value) and "sparsebench" in str(info.value) and "twin-pkg 1.0" in str(info.value)


def test_method_without_config_model_is_refused():
    class Bad:
        name = "bad"

    module = types.ModuleType("bad")
    module.register_methods = lambda register: register(Bad)
    with pytest.raises(PluginError, match="Config"):
        load_registry(extra_modules=[(module, "bad-pkg 0")])


def test_exception_in_a_hook_names_the_plugin_and_the_hook():
    from sparsebench import hookimpl

    class Broken(Method):
        name = "broken"

        @hookimpl
        def update_mask(self, run, step, masks):
            raise ValueError("boom")

    pm = make_plugin_manager([("broken", Broken())])
    with pytest.raises(HookError) as info:
        pm.hook.update_mask(run=None, step=1, masks={})
    assert "plugin 'broken'" in str(info.value) and "'update_mask'" in str(info.value) and "boom" in str(info.value)


def test_trace_env_var_prints_every_hook_call(monkeypatch, capsys):
    from sparsebench import hookimpl

    class Quiet(Method):
        name = "quiet"

        @hookimpl
        def on_train_start(self, run):
            return None

    monkeypatch.setenv("SPARSEBENCH_TRACE_HOOKS", "1")
    pm = make_plugin_manager([("quiet", Quiet())])
    pm.hook.on_train_start(run=None)
    err = capsys.readouterr().err
    assert "[hook] on_train_start" in err and "quiet" in err


def test_every_hookspec_has_a_docstring_describing_when_it_is_called():
    specs = [f for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "sparsebench_spec")]
    assert {"init_mask", "update_mask", "loss_terms", "on_mask_change"} <= {f.__name__ for f in specs}
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        assert len(doc) > 80, f"hookspec {spec.__name__} is undocumented"
        assert "Called" in doc or "called" in doc, f"hookspec {spec.__name__} does not say when it is called"


def test_every_hookspec_is_exercised_by_the_hook_order_test():
    source = (Path(__file__).parent / "test_run_loop.py").read_text()
    specs = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "sparsebench_spec")]
    untested = [n for n in specs if f"def {n}(" not in source]
    assert not untested, f"hooks without a test: {untested}"


def _hooks_mismatches() -> list[str]:
    """Where :class:`Hooks` differs from the hookspecs: one method per hookspec, taking the spec's
    parameters (names, order, annotations) keyword-only."""
    specs = {n: f for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "sparsebench_spec")}
    wrappers = {n for n, f in inspect.getmembers(Hooks, inspect.isfunction) if not n.startswith("_")}
    problems = [f"missing in Hooks: {n}" for n in sorted(set(specs) - wrappers)]
    problems += [f"Hooks.{n} is not a hookspec" for n in sorted(wrappers - set(specs))]
    for name in sorted(set(specs) & wrappers):
        expected = list(inspect.signature(specs[name]).parameters.values())
        got = list(inspect.signature(getattr(Hooks, name)).parameters.values())[1:]  # drop self
        if [(p.name, p.annotation) for p in got] != [(p.name, p.annotation) for p in expected]:
            problems.append(f"Hooks.{name}: parameters differ from the hookspec's")
        if any(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in got):
            problems.append(f"Hooks.{name}: parameters must be keyword-only")
    return problems


def test_hooks_wrapper_matches_every_hookspec():
    assert _hooks_mismatches() == []


def test_a_new_hookspec_without_a_hooks_method_is_caught(monkeypatch):
    from sparsebench import hookspec

    @hookspec
    def on_checkpoint(run, step):
        """Called after a checkpoint is written."""

    def update_mask(run, step, masks, extra):
        """A changed signature."""

    monkeypatch.setattr(hookspecs, "on_checkpoint", on_checkpoint, raising=False)
    monkeypatch.setattr(hookspecs, "update_mask", hookspec(firstresult=True)(update_mask))
    assert _hooks_mismatches() == ["missing in Hooks: on_checkpoint", "Hooks.update_mask: parameters differ from the hookspec's"]


def test_hooks_wrapper_calls_reach_the_plugins_and_merge_results():
    from sparsebench import hookimpl

    class Terms(Method):
        name = "terms"

        @hookimpl
        def loss_terms(self, run, step, batch, outputs):
            return {"extra": step}

        @hookimpl
        def on_run_end(self, run, summary):
            return {"seen": summary["x"]}

    class Clash(Terms):
        name = "clash"

    hooks = Hooks(make_plugin_manager([("terms", Terms())]))
    assert hooks.loss_terms(run=None, step=3, batch={}, outputs=None) == {"extra": 3}
    assert hooks.on_run_end(run=None, summary={"x": 1}) == {"seen": 1}
    with pytest.raises(TypeError):
        hooks.update_mask(None, 1, {})  # positional arguments are refused
    clashing = Hooks(make_plugin_manager([("terms", Terms()), ("clash", Clash())]))
    with pytest.raises(PluginError, match="loss term 'extra' is returned by two plugins"):
        clashing.loss_terms(run=None, step=1, batch={}, outputs=None)


def test_old_registry_imports_keep_working():
    from sparsebench import hooks, registry

    assert registry.Hooks is hooks.Hooks and registry.make_plugin_manager is hooks.make_plugin_manager
    assert registry.HookTimer is hooks.HookTimer
