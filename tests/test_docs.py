"""The README stays a ten-minute read whose links lead somewhere; the user guide lives in docs/.

``mkdocs build --strict`` (in ``make test``) checks the links inside docs/; the README is outside
the guide, so its relative links are checked here.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(markdown: str) -> list[str]:
    """The link targets of a markdown text that are files of this repository (no URL, no anchor)."""
    targets = (match.group(1).split("#")[0] for match in LINK.finditer(markdown))
    return [t for t in targets if t and "://" not in t and not t.startswith("mailto:")]


def test_the_readme_is_at_most_300_lines() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move detail into docs/"


def test_every_relative_link_of_the_readme_exists() -> None:
    links = relative_links((REPO / "README.md").read_text(encoding="utf-8"))

    assert "docs/index.md" in links
    assert [link for link in links if not (REPO / link).exists()] == []


def test_the_link_finder_finds_links_and_skips_urls() -> None:
    text = "[a](docs/a.md#part) [b](https://example.org/x) ([c](benchmarks/results/))"
    assert relative_links(text) == ["docs/a.md", "benchmarks/results/"]


def test_every_docs_page_is_in_the_guide_and_the_guide_is_built_by_make_test() -> None:
    config = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(path.name for path in (REPO / "docs").glob("*.md"))

    assert [page for page in pages if f": {page}" not in config] == []
    assert "mkdocs build --strict" in (REPO / "Makefile").read_text(encoding="utf-8")
