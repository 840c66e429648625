"""MkDocs hook: API entries for optional modules that may not exist yet.

An entry ``::: vectordb.integrations.NAME`` (with its indented options) in a page is kept
when ``vectordb/integrations/NAME.py`` exists in the source tree, and replaced by a note
otherwise, so ``mkdocs build --strict`` passes either way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The ``:::`` line and the indented options block under it.
_ENTRY = re.compile(r"^::: (vectordb\.integrations\.\w+)[ \t]*\n(?:[ \t]+\S.*\n)*", re.MULTILINE)


def _module_file(dotted: str) -> Path:
    return ROOT.joinpath(*dotted.split(".")).with_suffix(".py")


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    def keep_or_note(match: re.Match[str]) -> str:
        if _module_file(match.group(1)).is_file():
            return match.group(0)
        return (
            f'!!! note "`{match.group(1)}`"\n'
            "    This module is not part of this build of vectordb, so its API is not shown.\n"
        )

    return _ENTRY.sub(keep_or_note, markdown)
