"""Griffe extension for the docs build: the reStructuredText habits of the docstrings, as Markdown.

The docstrings use Sphinx roles (``:class:`FineTuneModule```, ``:mod:`lightning_ft.inputs```), which
Markdown would print as ``:class:`` followed by the code: each becomes the code alone (``~a.b.C``
becomes ``C``, as Sphinx shows it). A paragraph ending in ``::`` (before a literal block) ends in
one colon, as Sphinx prints it; the indented block after it is already code in Markdown.
Only the rendered text changes; no source is edited.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|obj|data|exc|const):`~?([^`]+)`")
_LITERAL_MARKER = re.compile(r"(\S)::$", re.MULTILINE)


def _plain(match: re.Match[str]) -> str:
    target = match.group(1)
    if match.group(0).split("`", 1)[1].startswith("~"):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the loaded package."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _LITERAL_MARKER.sub(r"\1:", _ROLE.sub(_plain, obj.docstring.value))
