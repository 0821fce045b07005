"""A hook implementation whose name is no hook specification is refused (issue 10 §3): the
method is marked BROKEN in `sparsebench methods`, a suite that uses it is refused by `validate`
and `run` (exit 2, one line, nothing written), and every other method is unaffected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparsebench import hookimpl, hookspec
from sparsebench.errors import PluginError
from sparsebench.hooks import make_plugin_manager, unknown_hooks, CORE_HOOKS
from sparsebench.methods import Method
from tests.conftest import TINY_SUITE
from tests.helpers import registry_with

MISSPELLED = '''
from sparsebench import hookimpl
from sparsebench.api import Method, random_start


class Misspelled(Method):
    name = "misspelled"

    @hookimpl
    def init_masks(self, run, model):
        return random_start(run, "uniform")


def register_methods(register):
    register(Misspelled)
'''


class Misspelled(Method):
    name = "misspelled"

    @hookimpl
    def init_masks(self, run, model):
        return None


class OwnSpecs:
    @hookspec
    def on_swap(self, run, step):
        """A hook this method declares (and implements)."""


class WithOwnHook(Method):
    name = "own-hook"
    hookspecs = OwnSpecs

    @hookimpl
    def on_swap(self, run, step):
        return None


class Renamed(Method):
    name = "renamed"

    @hookimpl(specname="init_mask")
    def draw_masks(self, run, model):
        return None


class Optional_(Method):
    name = "optional"

    @hookimpl(optionalhook=True)
    def maybe_later(self, run):
        return None


def test_unknown_hook_is_found_with_the_closest_known_one():
    assert unknown_hooks(Misspelled, CORE_HOOKS) == [("init_masks", "init_mask")]
    assert unknown_hooks(WithOwnHook, CORE_HOOKS) == []
    assert unknown_hooks(Renamed, CORE_HOOKS) == []  # specname names the hook
    assert unknown_hooks(Optional_, CORE_HOOKS) == []  # optionalhook: pluggy allows it


def test_registry_refuses_the_broken_method_only():
    registry = registry_with(Misspelled, WithOwnHook)
    assert "misspelled" in registry.names()  # listed, so `methods` can show it
    with pytest.raises(PluginError) as info:
        registry.get("misspelled")
    message = str(info.value)
    assert "\n" not in message
    assert "unknown hook 'init_masks' (did you mean 'init_mask'?)" in message and "tests 0" in message
    assert registry.get("own-hook") is WithOwnHook and registry.get("static") is not None
    assert registry.problem("static") is None


def test_a_suite_using_the_broken_method_does_not_expand(write_suite):
    from sparsebench.suites import expand_suite

    registry = registry_with(Misspelled)
    with pytest.raises(PluginError, match="init_masks"):
        expand_suite(write_suite(methods=["dense", "misspelled"]), registry)
    assert len(expand_suite(write_suite(methods=["dense", "static"]), registry)[1]) == 2


def test_plugin_manager_refuses_an_instance_with_an_unknown_hook():
    with pytest.raises(PluginError, match=r"plugin 'probe': unknown hook 'init_masks' \(did you mean 'init_mask'\?\)"):
        make_plugin_manager([("probe", Misspelled())])
    make_plugin_manager([("own", WithOwnHook()), ("renamed", Renamed())])  # accepted


def _install_misspelled(root: Path) -> dict:
    """A third-party package with a ``sparsebench`` entry point, importable through PYTHONPATH."""
    site = root / "site"
    (site / "misspelled_sb").mkdir(parents=True)
    (site / "misspelled_sb" / "__init__.py").write_text(MISSPELLED)
    dist = site / "misspelled_sb-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: misspelled-sb\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sparsebench]\nmisspelled = misspelled_sb\n")
    return {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}


def _sb(env, *args):
    return subprocess.run([sys.executable, "-m", "sparsebench", *map(str, args)], capture_output=True, text=True,
                          env=env)


def test_cli_marks_the_method_and_refuses_suites_that_use_it_before_writing_anything(tmp_path):
    env = _install_misspelled(tmp_path)
    listing = _sb(env, "methods")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if "BROKEN" in line)  # the table wraps cells
    assert "misspelled" in listing.stdout and "BROKEN: unknown hook" in row and "'init_masks'" in listing.stdout
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({**TINY_SUITE, "methods": ["dense", "misspelled"]}))
    for command in (["validate", suite], ["run", suite, "--out", tmp_path / "out"]):
        result = _sb(env, *command)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "unknown hook 'init_masks' (did you mean 'init_mask'?)" in lines[0]
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written, nothing trained
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({**TINY_SUITE, "methods": ["dense", "static"]}))
    assert _sb(env, "validate", ok).returncode == 0  # other methods are unaffected
