"""The public plugin API: what plugins may import, what ``sparsebench.api`` exports, the Method contract."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sparsebench
from sparsebench import api
from sparsebench.methods import CONTRACT, Method

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "plugins"
PACKAGE = "sparsebench_plugins"  # plugins/ is installed under this name
PUBLIC_TOP_LEVEL = set(sparsebench.__all__) | {"api"}


def _module_of(path: Path) -> str:
    parts = path.relative_to(PLUGINS).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def _imported(node: ast.AST, package: str) -> list[tuple[str, list[str]]]:
    """(module, names) for an import statement; relative imports resolved against ``package``."""
    if isinstance(node, ast.Import):
        return [(alias.name, []) for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        return [(base, [alias.name for alias in node.names])]
    return []


def import_violations(path: Path, source: str) -> list[str]:
    """Every import in a plugin file that breaks the rules of the public plugin API.

    A plugin imports from the harness only ``sparsebench`` (its public names) and
    ``sparsebench.api``. It never imports another first-party plugin; a sub-package (``sparsae/``)
    may import its own modules, and ``plugins/__init__.py`` imports every plugin to register it.
    """
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    own = package if package != PACKAGE else None
    registration = module == PACKAGE
    where = path.relative_to(PLUGINS.parent)
    problems = []
    for node in ast.walk(ast.parse(source)):
        for target, names in _imported(node, package):
            line = f"{where}:{node.lineno}"
            if target == "sparsebench":
                private = [n for n in names if n not in PUBLIC_TOP_LEVEL]
                if private:
                    problems.append(f"{line}: imports {', '.join(private)} from sparsebench (public: hookimpl, Method, api)")
            elif target.startswith("sparsebench.") and target != "sparsebench.api":
                problems.append(f"{line}: imports harness internals '{target}' (use sparsebench.api)")
            elif target == PACKAGE or target.startswith(PACKAGE + "."):
                inside_own = own is not None and (target == own or target.startswith(own + "."))
                if not (registration or inside_own):
                    problems.append(f"{line}: imports another first-party plugin '{target}'")
    return problems


def test_every_plugin_imports_only_the_public_api_and_no_other_plugin():
    files = sorted(PLUGINS.rglob("*.py"))
    assert len(files) > 10, "plugins/ not found"
    problems = [p for f in files for p in import_violations(f, f.read_text(encoding="utf-8"))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("where, source, reason", [
    ("rigl.py", "from sparsebench.masks import random_masks", "harness internals 'sparsebench.masks'"),
    ("rigl.py", "import sparsebench.loop", "harness internals 'sparsebench.loop'"),
    ("rigl.py", "from sparsebench import methods", "imports methods from sparsebench"),
    ("rigl.py", "def init_mask():\n    from sparsebench.context import perplexity", "harness internals"),
    ("rigl.py", "from sparsebench_plugins.static import random_start", "another first-party plugin"),
    ("rigl.py", "from . import static", "another first-party plugin 'sparsebench_plugins'"),
    ("rigl.py", "import sparsebench_plugins.sparsae.swaps", "another first-party plugin"),
    ("sparsae/search.py", "from sparsebench_plugins.rigl import RigL", "another first-party plugin"),
    ("sparsae/search.py", "from .. import static", "another first-party plugin"),
])
def test_a_forbidden_import_is_reported_with_file_and_line(where, source, reason):
    problems = import_violations(PLUGINS / where, source)
    assert len(problems) == 1 and reason in problems[0], problems
    assert problems[0].startswith(f"plugins/{where}:")


@pytest.mark.parametrize("where, source", [
    ("rigl.py", "import sparsebench\nfrom sparsebench import Method, hookimpl\nfrom sparsebench.api import drop_lowest"),
    ("rigl.py", "import sparsebench.api\nfrom sparsebench import api\nimport torch\nfrom pydantic import BaseModel"),
    ("sparsae/search.py", "from sparsebench_plugins.sparsae.swaps import apply_swaps\nfrom .proxy import select"),
    ("sparsae/__init__.py", "from sparsebench_plugins.sparsae.burn_in import BurnIn\nfrom . import regrow"),
    ("__init__.py", "from sparsebench_plugins.rigl import RigL\nfrom sparsebench_plugins.sparsae import METHODS"),
])
def test_allowed_imports_pass(where, source):
    assert import_violations(PLUGINS / where, source) == []


# ------------------------------------------------------------------------------ sparsebench.api


# context.perplexity is documented in sparsebench.api's docstring only (context.py has other owners now).
UNDOCUMENTED = {"hookimpl", "hookspec", "perplexity"}


def test_api_exports_exist_and_are_documented():
    for name in api.__all__:
        value = getattr(api, name)
        if callable(value) and name not in UNDOCUMENTED:
            assert inspect.getdoc(value), f"sparsebench.api.{name} has no docstring"
    assert {"hookimpl", "Method", "cross_entropy", "autocast", "perplexity", "random_start", "drop_lowest",
            "grow_highest", "erk_densities", "LayerInfo", "PluginError", "magnitude_masks"} <= set(api.__all__)


def test_api_names_are_the_harness_objects_not_copies():
    from sparsebench.drop_grow import drop_lowest
    from sparsebench.losses import autocast_context

    assert api.autocast is autocast_context and api.autocast_context is autocast_context
    assert api.drop_lowest is drop_lowest and api.hookimpl is sparsebench.hookimpl


def test_hookimpl_and_method_import_from_the_package():
    from sparsebench import Method as TopLevelMethod
    from sparsebench import hookimpl

    assert TopLevelMethod is Method and hookimpl is api.hookimpl
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        sparsebench.Nope  # noqa: B018


def test_importing_the_package_does_not_load_torch_or_pydantic():
    code = "import sys, sparsebench; print(sorted(m for m in ('torch', 'pydantic') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------ the Method contract

# Objects the harness holds method classes or plugin instances in, and attributes it reads on
# such names that belong to something else (a DeepSpeed parameter's ZeRO mapping).
METHOD_HOLDERS = re.compile(r"^(plugin|plugins\[.*\]|p|method|method_cls|cls|entry\.cls)$")
NOT_METHOD_ATTRIBUTES = {"_hp_mapping"}


def _attributes_read_on_methods() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "sparsebench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant) and METHOD_HOLDERS.match(ast.unparse(node.args[0]))):
                found.setdefault(node.args[1].value, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_attribute_the_harness_reads_on_a_method_is_in_the_contract():
    read = _attributes_read_on_methods()
    assert {"changes_density", "ignores_sparsity", "observer", "components", "state_dict"} <= set(read)
    undeclared = {name: where for name, where in read.items() if name not in CONTRACT and name not in NOT_METHOD_ATTRIBUTES}
    assert not undeclared, f"declare these on sparsebench.methods.Method (and in CONTRACT): {undeclared}"


def test_every_contract_attribute_is_declared_and_documented_on_method():
    source = inspect.getsource(Method)
    instance = Method()
    for name in CONTRACT:
        assert hasattr(instance, name), f"Method does not declare '{name}'"
        member = getattr(Method, name, None)
        if callable(member) and not isinstance(member, type):
            assert inspect.getdoc(member), f"Method.{name} has no docstring"
        else:  # an attribute: documented by a `#:` comment right above its declaration
            declaration = re.search(rf"\n((?:\s*#:.*\n)+)\s*(self\.)?{name}\b", source)
            assert declaration, f"Method.{name} has no '#:' comment"


def test_method_defaults_leave_a_plain_method_inert():
    method = Method()
    assert (method.changes_density, method.ignores_sparsity, method.observer, method.hookspecs) == (False, False, False, None)
    assert method.components() == [] and method.state_dict() == {} and method.load_state_dict({}) is None
