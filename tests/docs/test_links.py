"""Links and paths in the README and the manual point at things that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs.markdown import ROOT, anchors, links, pages, section, text, without_code

PAGES = pages()
#: repository files named in the text, e.g. `tests/harness/test_plugins.py::test_x`, `python benchmarks/x.py`
REPO_PATH = re.compile(
    r"(?<![\w/.<-])((?:sparsebench|plugins|tests|benchmarks|suites|kernels|docs|\.ci)/[\w./-]+?\.(?:py|yaml|md|toml|json)"
    r"|\.ci/run)(?:::(\w+))?(?![\w/])"
)


def _ids(paths: list[Path]) -> list[str]:
    return [p.relative_to(ROOT).as_posix() for p in paths]


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_relative_links_resolve_to_files_and_headings(page):
    source = text(page)
    broken = []
    for target in links(source):
        if re.match(r"[a-z]+:", target):  # https:, mailto: — not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(text(file)):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_repository_paths_named_in_the_text_exist(page):
    source = without_code(text(page))  # code blocks hold a user's files (tests/test_my_method.py)
    missing = []
    for path, function in REPO_PATH.findall(source):
        file = ROOT / path
        if not file.exists():
            missing.append(path)
        elif function and not re.search(rf"^def {function}\(", text(file), flags=re.M):
            missing.append(f"{path}::{function}")
    assert not missing, missing


def test_the_link_checker_finds_a_broken_link_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](nowhere.md) [bad](#no-such)\n\n```\n[code](ignored.md)\n```\n")
    assert links(text(page)) == ["#title", "nowhere.md", "#no-such"]
    assert anchors(text(page)) == {"title"}
    assert "ignored.md" not in without_code(text(page))


def test_anchors_follow_githubs_rules():
    source = "## `dense` — the reference\n## Choices the specification left open (defaults, and why)\n"
    assert anchors(source) == {"dense--the-reference", "choices-the-specification-left-open-defaults-and-why"}


def test_path_finder_sees_paths_in_commands_and_test_ids_but_not_inside_other_paths():
    found = REPO_PATH.findall("`python benchmarks/a.py --x`, `tests/b/test_c.py::test_d`, my/tests/e.py, <out>/suites/f.yaml")
    assert found == [("benchmarks/a.py", ""), ("tests/b/test_c.py", "test_d")]


def test_the_module_directory_lists_every_module_of_the_harness():
    directory = section(text(ROOT / "docs" / "architecture.md"), "module-directory")
    listed = set(re.findall(r"`(sparsebench/[\w/]+\.py)`", directory))
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "sparsebench").rglob("*.py")}
    assert listed == on_disk, f"missing: {sorted(on_disk - listed)}; gone: {sorted(listed - on_disk)}"
