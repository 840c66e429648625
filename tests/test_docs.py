"""The documentation site: ``mkdocs build --strict`` passes, every page is built, the API
reference is generated from the docstrings, and nothing is fetched from the network.

Skipped unless the ``docs`` extra (mkdocs-material, mkdocstrings[python]) is installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parent.parent

PAGES = [
    "quickstart",
    "concepts",
    "living-index",
    "async",
    "gpu",
    "cli",
    "integrations",
    "reliability",
    "file-format",
    "benchmarks",
    "errors",
    "api",
    "api-integrations",
]

# A stylesheet, script, image or font loaded from another host.
_REMOTE = re.compile(
    r"<(?:link|script|img|iframe|source)\b[^>]*\b(?:href|src)=[\"'](?:https?:)?//", re.IGNORECASE
)
_REMOTE_CSS = re.compile(r"(?:@import|url\()\s*[\"']?(?:https?:)?//", re.IGNORECASE)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_every_page_is_built(site: Path) -> None:
    assert (site / "index.html").is_file()  # docs/index.md
    for page in PAGES:
        assert (site / page / "index.html").is_file(), page


def test_api_reference_comes_from_the_docstrings(site: Path) -> None:
    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in (
        "ClusteredIndex.search",
        "ClusteredIndex.build",
        "ClusteredIndex.add",
        "AsyncEngine.search",
        "EngineStats",
        "Metric",
        "available_backends",
        "make_clustered",
        "InvalidIndexFileError",
    ):
        assert name in html, name
    # Sphinx roles are rewritten for Markdown (docs/hooks/griffe_rst.py).
    assert ":meth:" not in html


def test_nothing_is_loaded_from_the_network(site: Path) -> None:
    for path in site.rglob("*"):
        if path.suffix in (".html", ".css", ".js"):
            text = path.read_text(encoding="utf-8", errors="replace")
            pattern = _REMOTE if path.suffix == ".html" else _REMOTE_CSS
            match = pattern.search(text)
            assert match is None, f"{path.relative_to(site)}: {match.group(0) if match else ''}"
