"""The wheel ships every package of the source tree (an editable install would hide a missing one)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    on_disk = set()
    for import_name, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join((import_name, *relative)))
    assert on_disk == listed, f"missing from pyproject: {sorted(on_disk - listed)}; listed but absent: {sorted(listed - on_disk)}"
