"""Griffe extension: render the reStructuredText bits of vectordb's docstrings as Markdown.

The docstrings are numpydoc with Sphinx roles (``:meth:`add```) and literal blocks
introduced by ``::``. mkdocstrings renders docstrings as Markdown, where both would show
verbatim, so this extension rewrites them before the docstrings are parsed: a role becomes
a code span, a trailing ``::`` a single ``:`` (the indented block after it is already a
Markdown code block).
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_ROLE = re.compile(r":(?:py:)?(?:meth|class|mod|func|attr|data|exc|obj|const):`~?([^`]+)`")
_LITERAL = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)
_LONE_LITERAL = re.compile(r"^[ \t]*::[ \t]*$", re.MULTILINE)


def to_markdown(text: str) -> str:
    """``text`` with Sphinx roles turned into code spans and ``::`` into ``:``."""
    text = _ROLE.sub(r"`\1`", text)
    text = _LITERAL.sub(r"\1:", text)
    return _LONE_LITERAL.sub("", text)


class RestToMarkdown(Extension):
    """Rewrite every docstring of the loaded objects with :func:`to_markdown`."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
