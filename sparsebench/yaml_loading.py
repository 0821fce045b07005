"""Reading suite YAML safely: bounded alias expansion, ``include:`` without cycles, no echo of foreign files.

Suites are read with PyYAML's safe loader (no ``!!python`` tags). Before a document is turned
into Python objects its node graph is measured: aliases make a 1 KB "billion laughs" document
expand to gigabytes once a config is hashed or copied, so a document whose expanded size passes
:data:`MAX_EXPANDED_NODES` is refused. The measure is memoised per node, so it costs one visit
per distinct node however deep the aliases nest.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from sparsebench.errors import SuiteError

#: expanded nodes (scalars, sequences, mappings, counting every alias use in full) one document may hold;
#: the largest shipped suite has a few hundred.
MAX_EXPANDED_NODES = 100_000
#: a suite file is a few kilobytes; anything much larger is not one.
MAX_FILE_BYTES = 1_000_000


def _expanded_size(node: yaml.Node, where: str) -> int:
    """Nodes of the document once every alias is expanded; refuses recursive and oversized ones."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise SuiteError(f"{where}: a YAML anchor refers to itself (recursive alias)")
        visiting.add(key)
        if isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in n.value)
        elif isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        else:
            total = 1
        visiting.discard(key)
        if total > MAX_EXPANDED_NODES:
            raise SuiteError(
                f"{where}: the document expands to more than {MAX_EXPANDED_NODES:,} YAML nodes "
                "(aliases nested too deep); a suite is far smaller"
            )
        sizes[key] = total
        return total

    # Deep nesting without aliases would hit Python's recursion limit: refuse it as malformed.
    try:
        return size(node)
    except RecursionError:
        raise SuiteError(f"{where}: the document nests too deeply to be a suite") from None


def load_yaml(text: str, where: str) -> Any:
    """One YAML document through the safe loader, its expanded size bounded first."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, where)
        return loader.construct_document(node)
    except yaml.constructor.ConstructorError as exc:
        tag = getattr(exc.problem_mark, "line", None)
        at = f" at line {tag + 1}" if tag is not None else ""
        raise SuiteError(f"{where}: YAML tag not allowed{at}: suites hold plain values (no !!python or custom tags)") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SuiteError(f"{where}: malformed YAML{at}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise SuiteError(f"{where}: malformed YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    except RecursionError:
        raise SuiteError(f"{where}: the document nests too deeply to be a suite") from None
    finally:
        loader.dispose()


def parse_set_value(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``: the dotted key and its value read as (safe, bounded) YAML."""
    if "=" not in item:
        raise SuiteError(f"--set expects KEY=VALUE (dotted key), got '{item}'")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise SuiteError(f"--set {item}: the key must be a dotted name such as training.steps")
    return key, load_yaml(value, f"--set {key}")


def _read_text(path: Path, where: str) -> str:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise SuiteError(f"{where}: {path} is larger than {MAX_FILE_BYTES:,} bytes; not a suite file")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SuiteError(f"{where}: {path} is not a text file") from None
    except OSError as exc:
        raise SuiteError(f"{where}: cannot read {path} ({exc.strerror or type(exc).__name__})") from None


def read_suite_file(path: Path, known_keys: Iterable[str], _chain: Optional[list[Path]] = None) -> dict[str, Any]:
    """Read a suite file, following ``include:`` (a path or list of paths, relative to the file).

    Included files come first and the including file's keys override theirs (mappings merge
    key by key). An include cycle, a file including itself, an include that is not a path and a
    file that is not a suite mapping are refused in one line; the content of a file that is not a
    suite is never echoed.
    """
    path = Path(path)
    chain = list(_chain or [])
    included_from = f" (included from {chain[-1]})" if chain else ""
    if not path.is_file():
        raise SuiteError(f"{path}: suite file not found{included_from}")
    resolved = path.resolve()
    if resolved in chain:
        cycle = " → ".join(str(p) for p in [*chain[chain.index(resolved):], resolved])
        raise SuiteError(f"{path}: include cycle: {cycle}")
    raw = load_yaml(_read_text(path, str(path)), str(path))
    known = set(known_keys)
    if not isinstance(raw, dict) or (chain and not set(raw) <= known) or (raw and not set(raw) & known):
        # Keys of a foreign file (e.g. an included /etc/shadow) are its content: do not show them.
        raise SuiteError(f"{path}: not a suite mapping{included_from} (a suite maps keys such as name, methods, training)")
    bad_key = next((k for k in raw if not isinstance(k, str)), None)
    if bad_key is not None:
        raise SuiteError(f"{path}: top-level key {bad_key!r} is not a name (keys: {', '.join(sorted(known))})")
    includes = raw.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise SuiteError(f"{path}: include must be a file path or a list of file paths, got {includes!r}")
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = deep_merge(merged, read_suite_file(path.parent / inc, known, [*chain, resolved]))
    return deep_merge(merged, raw)


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``; nested mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested mappings, creating (or replacing non-mapping) intermediate levels."""
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value
