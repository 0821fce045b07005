"""The manual in docs/: its examples run, its references match the code, its tables are true."""

from __future__ import annotations

import inspect
import json
import re
import sys
import types

import yaml

from tests.docs.markdown import DOCS, ROOT, code_blocks, section, table_rows, text
from tests.helpers import registry_with, run_configs, train_config

PLUGINS = text(DOCS / "plugins.md")


def _plugin_example() -> types.ModuleType:
    """The module of the plugin guide's example, executed as a user's package would be."""
    source = next(b for b in code_blocks(PLUGINS, "python") if "register_methods" in b)
    module = types.ModuleType("mymethod")
    exec(compile(source, "docs/plugins.md", "exec"), module.__dict__)
    return module


def _hookspecs() -> dict[str, inspect.Signature]:
    import sparsebench.hookspecs as specs

    found = [(name, f) for name, f in vars(specs).items() if callable(f) and hasattr(f, "sparsebench_spec")]
    found.sort(key=lambda item: inspect.getsourcelines(item[1])[1])  # the order of the file
    return {name: f for name, f in found}


# ------------------------------------------------------------------ plugins.md


def test_plugin_example_trains_in_a_suite(write_suite):
    cls = _plugin_example().KeepLargest
    registry = registry_with(cls)
    cfg = run_configs(write_suite(methods=[{"keep_largest": {"noise": 0.1}}]), registry)[0]
    setup, result = train_config(cfg, registry)
    masks = setup.run.masks.values()
    density = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert abs(density - 0.2) < 1e-3 and result.val_loss > 0


def test_plugin_example_passes_the_conformance_kit():
    from sparsebench import conformance as kit

    cls = _plugin_example().KeepLargest
    kit.check_config(cls, {"noise": 0.1})
    first, second = kit.run_kit(cls, {"noise": 0.1}), kit.run_kit(cls, {"noise": 0.1})
    kit.check_initial_masks(first, cls, 0.8, 0.01)
    assert kit.check_updates(first, cls) == 0  # a static mask: nothing to update
    kit.check_final_density(first, cls, 0.8, 0.01)
    kit.check_state_dict(first, cls, {"noise": 0.1})
    kit.check_determinism(first, second)


def test_plugin_example_entry_point_names_the_example_package():
    toml = next(b for b in code_blocks(PLUGINS, "toml"))
    python = next(b for b in code_blocks(PLUGINS, "python") if "register_methods" in b)
    package = re.match(r"# (\w+)/__init__\.py", python).group(1)
    entries = toml.split("[project.entry-points.sparsebench]\n", 1)[1].strip().splitlines()
    assert entries == [f'{package} = "{package}"']


def test_conformance_example_subclasses_the_kit(monkeypatch):
    from sparsebench.conformance import MethodConformance, check_config
    from sparsebench_plugins.set_method import SET

    monkeypatch.setitem(sys.modules, "my_package", types.SimpleNamespace(MyMethod=SET))
    source = next(b for b in code_blocks(PLUGINS, "python") if "MethodConformance" in b)
    namespace: dict = {}
    exec(compile(source, "docs/plugins.md", "exec"), namespace)
    test_class = next(v for k, v in namespace.items() if k.startswith("Test"))
    assert issubclass(test_class, MethodConformance) and test_class.method is SET
    check_config(SET, test_class.overrides)


def test_hook_reference_documents_every_hookspec_and_nothing_else():
    documented = {}
    for row in table_rows(section(PLUGINS, "hook-reference")):
        name, params = re.fullmatch(r"`(\w+)\(([\w, ]*)\)`", row[0]).groups()
        documented[name] = ([p.strip() for p in params.split(",") if p.strip()], row[1])
    specs = _hookspecs()
    assert list(documented) == list(specs), "hooks documented in another order, missing or unknown"
    for name, f in specs.items():
        params, kind = documented[name]
        assert params == list(inspect.signature(f).parameters), name
        assert (kind == "firstresult") == bool(f.sparsebench_spec["firstresult"]), name


def test_method_attributes_list_names_every_attribute_of_the_contract():
    from sparsebench.methods import CONTRACT, Method

    listed = section(PLUGINS, "method-attributes")
    pairs = re.findall(r"^- `(\w+)[^`]*`(?: / `(\w+)[^`]*`)?", listed, flags=re.M)  # "- `a()` / `b(x)` for ..."
    named = {name for pair in pairs for name in pair if name}
    assert named == set(CONTRACT) - {"name", "Config"}  # name and Config: the example above
    defaults = re.findall(r"`(\w+) = [^`]+` \(default `([^`]+)`\)", listed)
    assert len(defaults) == 7
    for attribute, default in defaults:
        assert repr(getattr(Method, attribute)) == default, attribute


def test_hook_order_names_every_hook_with_its_parameters():
    order = PLUGINS.split("## The hooks, in the order a run calls them\n", 1)[1].split("\n## ", 1)[0]
    order = " ".join(order.split())
    for name, f in _hookspecs().items():
        assert f"`{name}({', '.join(inspect.signature(f).parameters)})`" in order, name


def test_conformance_table_lists_every_kit_test():
    from sparsebench.conformance import MethodConformance

    kit_section = PLUGINS.split("## Testing a method plugin: the conformance kit\n", 1)[1]
    documented = {row[0].strip("`") for row in table_rows(kit_section) if row[0].startswith("`test_")}
    assert documented == {n for n in dir(MethodConformance) if n.startswith("test_")}


def test_conformance_kit_defaults_and_model_are_as_documented():
    from sparsebench.conformance import MethodConformance, tiny_setup
    from sparsebench_plugins.static import Static

    for attribute, value in re.findall(r"`(\w+)` \(([\d.]+)\)", PLUGINS.split("Class attributes:", 1)[1].split("\n\n")[0]):
        assert getattr(MethodConformance, attribute) == float(value), attribute
    blocks, weights = re.search(r"a tiny GPT-2 \((\d+) blocks, ([\d,]+) sparsifiable weights\)", PLUGINS).groups()
    setup = tiny_setup(Static)
    assert setup.run.model.config.n_layer == int(blocks)
    assert sum(p.numel() for p in setup.run.sparsifiable.values()) == int(weights.replace(",", ""))


# ------------------------------------------------------------------ methods.md, sparsae.md, suites.md


def test_every_registered_method_has_a_section_or_row(registry):
    methods, sparsae, loggers = text(DOCS / "methods.md"), text(DOCS / "sparsae.md"), text(DOCS / "loggers.md")
    for name in registry.names():
        if getattr(registry.get(name), "observer", False):  # loggers: a section each in loggers.md
            assert re.search(rf"^## `{name}`$", loggers, re.M), name
        else:
            assert re.search(rf"^## `{name}`", methods, re.M) or f"| `{name}` |" in sparsae, name


def _option_rows(body: str, defaults: dict) -> list[tuple[str, str]]:
    """``(option, documented default)`` of the table rows of ``body`` that name an option."""
    return [(row[0].strip("`"), row[1].strip("`")) for row in table_rows(body)
            if row[0].strip("`") in defaults and len(row) >= 3]


def _same_default(value, shown: str) -> bool:
    if isinstance(value, str):
        return value == shown  # as written in the suite (a regex keeps its backslashes)
    if isinstance(value, bool) or value is None:
        return json.dumps(value) == shown
    return float(value) == float(shown)


def test_every_option_of_a_baseline_has_a_row_with_its_real_default(registry):
    sections = re.findall(r"^## `(\w+)`[^\n]*\n(.*?)(?=^## |\Z)", text(DOCS / "methods.md"), flags=re.S | re.M)
    assert len(sections) >= 7
    for name, body in sections:
        defaults = registry.get(name).Config().model_dump(mode="json")
        rows = _option_rows(body, defaults)
        assert {option for option, _ in rows} == set(defaults), f"{name}: options without a row"
        for option, shown in rows:
            assert _same_default(defaults[option], shown), (name, option, defaults[option], shown)


def test_sparsae_choices_table_shows_the_real_defaults(registry):
    body = text(DOCS / "sparsae.md").split("## Choices the specification left open", 1)[1].split("\n## ", 1)[0]
    defaults = registry.get("sparsae").Config().model_dump(mode="json")
    rows = _option_rows(body, defaults)
    assert len(rows) >= 6
    for option, shown in rows:
        assert _same_default(defaults[option], shown), (option, defaults[option], shown)


def test_summary_keys_are_the_documented_ones(write_suite, registry):
    from sparsebench.summary import build_summary

    body = text(DOCS / "results.md").split("## `summary.json`\n", 1)[1].split("plus what\nplugins add", 1)[0]
    documented = {key.strip() for chunk in re.findall(r"`([^`]+)`", body) for key in chunk.split(",")}
    cfg = run_configs(write_suite(methods=[{"static": {"distribution": "erk"}}]), registry)[0]
    setup, result = train_config(cfg, registry)
    summary = build_summary(setup, result)
    summary.setdefault("error", None)  # written by failed runs only
    assert set(summary) == documented - {"ok", "failed"}


def test_shipped_suites_table_counts_the_runs_of_each_suite(registry):
    from sparsebench.suites import expand_suite

    rows = table_rows(text(DOCS / "suites.md").split("## Shipped suites\n", 1)[1])
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "suites").glob("*.yaml")}
    assert {row[0].strip("`") for row in rows} == shipped
    for row in rows:
        _, runs = expand_suite(ROOT / row[0].strip("`"), registry, None)
        assert len(runs) == int(row[2]), row[0]


def test_sparsae_component_table_lists_each_plugins_hooks(registry):
    table = text(DOCS / "sparsae.md").split("| plugin | what it does | hooks |", 1)[1].split("\n\n", 1)[0]
    rows = table_rows("| plugin | what it does | hooks |" + table)
    checked = 0
    for name, _, hooks in rows:
        if not re.fullmatch(r"`\w+`", name) or hooks == "—":
            continue
        documented = set()
        for hook in re.findall(r"`([\w/]+)`", hooks):
            documented |= {"before_optimizer_step", "after_optimizer_step"} if hook == "before/after_optimizer_step" else {hook}
        cls = registry.get(name.strip("`"))
        assert documented == {n for n in dir(cls) if hasattr(getattr(cls, n), "sparsebench_impl")}, name
        checked += 1
    assert checked == 4


def test_sparsae_suite_example_validates(write_suite, registry):
    block = next(b for b in code_blocks(text(DOCS / "sparsae.md"), "yaml") if "methods:" in b)
    runs = run_configs(write_suite(methods=yaml.safe_load(block)["methods"]), registry)
    assert [cfg.method.name for cfg in runs] == ["sparsae", "sparsae", "sparsae", "rigl", "set"]


# ------------------------------------------------------------------ index.md


def test_index_lists_every_page_of_the_manual():
    linked = set(re.findall(r"\]\(([\w-]+\.md)\)", text(DOCS / "index.md")))
    assert linked == {p.name for p in DOCS.glob("*.md")} - {"index.md"}
