"""The README is the front page: its commands, tables and suite must be true as written."""

from __future__ import annotations

import re

import yaml

from tests.docs.markdown import README, ROOT, code_blocks, table_rows, text

FRONT = text(README)


def _section(title: str) -> str:
    return FRONT.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_is_a_front_page_of_at_most_400_lines():
    assert len(FRONT.splitlines()) <= 400


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(b.strip() for b in code_blocks(FRONT, "bash") if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    ci_command = ci.split("# >>> README test command\n")[1].split("\n# <<< README test command")[0].strip()
    assert ci_command == test_command


def test_readme_main_command_runs_the_smoke_suite():
    main = code_blocks(FRONT, "bash")[0].strip()
    assert main.endswith("sparsebench run suites/smoke.yaml") and "torch==2.13.0" in main


def test_smoke_table_has_one_row_per_method_of_the_smoke_suite(registry):
    from sparsebench.suites import expand_suite

    table = next(b for b in code_blocks(FRONT, "") if b.startswith("synthetic floor"))
    shown = sorted(line.split()[0] for line in table.splitlines()[2:])
    _, runs = expand_suite(ROOT / "suites" / "smoke.yaml", registry, None)
    assert shown == sorted(cfg.method.display for cfg in runs)


def test_commands_table_documents_every_cli_command():
    from sparsebench.cli import app

    documented = {re.match(r"`sparsebench (\w+)", row[0]).group(1) for row in table_rows(_section("Commands"))}
    assert documented == {c.name or c.callback.__name__ for c in app.registered_commands}


def test_readme_suite_expands_to_the_runs_it_claims(tmp_path, registry):
    from sparsebench.suites import expand_suite

    block = code_blocks(_section("A suite"), "yaml")[0]
    path = tmp_path / "first-look.yaml"
    path.write_text(block)
    suite, runs = expand_suite(path, registry, None)
    claimed = int(re.search(r"lists its (\d+) runs", _section("A suite")).group(1))
    assert suite.name == yaml.safe_load(block)["name"] and len(runs) == claimed
    by_method = {}
    for cfg in runs:
        by_method[cfg.method.display] = by_method.get(cfg.method.display, 0) + 1
    assert by_method == {"dense": 2, "static": 4, "rigl": 4}


def test_methods_table_names_registered_methods(registry):
    names = {re.match(r"`(\w+)`", row[0]).group(1) for row in table_rows(_section("Methods"))}
    assert names <= set(registry.names())
    assert {"dense", "static", "magnitude", "gmp", "set", "rigl", "gumbel", "sparsae"} <= names


def test_manual_table_links_every_page_of_the_manual():
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", _section("The manual")))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert linked == pages
