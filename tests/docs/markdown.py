"""Reading the README and the manual: pages, fenced code blocks, links and marked sections."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def pages() -> list[Path]:
    """The README, every page of the manual, and the results folder's README."""
    return [README, *sorted(DOCS.glob("*.md")), ROOT / "results" / "README.md"]


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def fenced_blocks(source: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block, in order (language ``""`` when none)."""
    blocks, lang, body = [], None, []
    for line in source.splitlines(keepends=True):
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def code_blocks(source: str, lang: str) -> list[str]:
    """The bodies of the fenced blocks of ``lang``, in order."""
    return [body for block_lang, body in fenced_blocks(source) if block_lang == lang]


def section(source: str, marker: str) -> str:
    """The text between ``<!-- marker:start -->`` and ``<!-- marker:end -->``."""
    return source.split(f"<!-- {marker}:start -->", 1)[1].split(f"<!-- {marker}:end -->", 1)[0]


def table_rows(source: str) -> list[list[str]]:
    """The body rows of the markdown tables in ``source`` (header and rule rows dropped)."""
    rows = []
    lines = [line.strip() for line in source.splitlines()]
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            continue
        is_rule = bool(re.fullmatch(r"\|[\s|:-]+\|", line))
        is_header = i + 1 < len(lines) and re.fullmatch(r"\|[\s|:-]+\|", lines[i + 1] or "x") is not None
        if not (is_rule or is_header):
            cells = re.split(r"(?<!\\)\|", line.strip("|"))
            rows.append([c.strip() for c in cells])
    return rows


def without_code(source: str) -> str:
    """``source`` without its fenced code blocks (links and headings inside code are not)."""
    out, inside = [], False
    for line in source.splitlines(keepends=True):
        if line.startswith("```"):
            inside = not inside
        elif not inside:
            out.append(line)
    return "".join(out)


def links(source: str) -> list[str]:
    """Targets of the markdown links ``[text](target)`` outside code blocks."""
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", without_code(source))


def anchors(source: str) -> set[str]:
    """GitHub's anchors of the headings of a page."""
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", without_code(source), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out
