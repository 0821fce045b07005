"""The README is the user's manual: its commands and its plugin example must work as written."""

from __future__ import annotations

import re
import types
from pathlib import Path

from tests.helpers import registry_with, run_configs, train_config

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()


def _code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(b.strip() for b in _code_blocks("bash") if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    ci_command = ci.split("# >>> README test command\n")[1].split("\n# <<< README test command")[0].strip()
    assert ci_command == test_command


def test_readme_main_command_runs_the_smoke_suite():
    main = _code_blocks("bash")[0].strip()
    assert main.endswith("sparsebench run suites/smoke.yaml") and "torch==2.13.0" in main


def test_readme_plugin_example_runs_in_a_suite(write_suite):
    source = next(b for b in _code_blocks("python") if "register_methods" in b)
    module = types.ModuleType("readme_example")
    exec(compile(source, "README.md", "exec"), module.__dict__)
    cls = module.PruneSmallest
    registry = registry_with(cls)
    cfg = run_configs(write_suite(methods=[{"prune_smallest": {"every": 50}}]), registry)[0]
    setup, result = train_config(cfg, registry)
    density = sum(int(m.sum()) for m in setup.run.masks.values()) / sum(m.numel() for m in setup.run.masks.values())
    assert abs(density - 0.2) < 1e-3 and result.val_loss > 0
