"""The documentation: the site builds in strict mode, the README stays a front page, links resolve.

The strict build fails on any MkDocs warning: a broken link or anchor between pages, a page missing
from the nav, a docstring griffe cannot parse, a ``::: lightning_ft.x`` block whose symbol is gone.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# [text](target) or [text](target "title"); images too. Code spans and fenced blocks are removed first.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.DOTALL)
_EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//|#)", re.IGNORECASE)  # http:, mailto:, //host, #anchor


def relative_links(markdown: str) -> list[str]:
    """Link targets in ``markdown`` that point at files (no scheme, not a bare ``#anchor``)."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", markdown))
    return [target for target in _LINK.findall(text) if not _EXTERNAL.match(target)]


def broken_links(path: Path) -> list[str]:
    """Relative link targets of one Markdown file whose file does not exist."""
    broken = []
    for target in relative_links(path.read_text(encoding="utf-8")):
        file = target.split("#", 1)[0].split("?", 1)[0]
        if not (path.parent / file).exists():
            broken.append(target)
    return broken


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def test_link_finder_sees_links_and_skips_code() -> None:
    text = (
        "[a](docs/a.md) [b](b.md#part) ![img](img/x.png) [web](https://x.org) [top](#top)\n"
        "`[not](in_code.md)`\n```\n[not](in_fence.md)\n```\n"
    )
    assert relative_links(text) == ["docs/a.md", "b.md#part", "img/x.png"]


def test_broken_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# there\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#there) [gone](missing.md) [web](https://example.org)\n")
    assert broken_links(page) == ["missing.md"]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(path: Path) -> None:
    assert broken_links(path) == [], f"{path.relative_to(ROOT)} links to files that do not exist"


def test_readme_is_a_front_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 150, f"README.md has {len(lines)} lines: move detail into docs/ (the site)"


def test_site_builds_in_strict_mode(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}\n{result.stdout}"
    assert (tmp_path / "site" / "reference" / "module" / "index.html").is_file()
