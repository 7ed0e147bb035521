"""The documentation stays navigable: every relative link resolves, and each page reads in a sitting."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md", *ROOT.glob("docs/*.md")])
# [text](target) and ![alt](target); the target ends at the first space or closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page) -> set[str]:
    """The anchors of a page's headings (``#`` lines inside code blocks are comments, not headings)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def _links(page) -> list[str]:
    text = CODE.sub("", page.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t)]  # http:, https:, mailto:


def _broken(page) -> list[str]:
    """The page's relative links whose file, or whose heading anchor in a markdown file, does not exist."""
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert not _broken(page), f"{page.relative_to(ROOT)}: links that do not resolve: {_broken(page)}"


def test_pages_read_in_a_sitting():
    lines = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in PAGES}
    assert lines["README.md"] < 200, lines["README.md"]
    long = {name: n for name, n in lines.items() if name.startswith("docs/") and n >= 400}
    assert not long, f"docs pages of 400 lines or more: {long}"


def test_the_link_check_fails_on_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](page.md#title) [gone](missing.md) [bad anchor](page.md#nowhere)\n")
    assert _links(page) == ["page.md#title", "missing.md", "page.md#nowhere"]
    assert _broken(page) == ["missing.md", "page.md#nowhere"]
