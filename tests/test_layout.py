"""The package's layout stays as designed.

* every module under ``vectordb/`` is at most ``MAX_LINES`` lines long;
* every module's ``__all__`` is honest: each listed name exists in the module (once), and
  each public class and function the module defines itself is listed. A module without
  ``__all__`` fails, except ``__main__`` and empty package ``__init__`` files;
* the import contracts in ``pyproject.toml`` (``[tool.importlinter]``: the layers, who alone
  imports cupy, click, tqdm, langchain_core, llama_index) hold, checked by ``lint-imports``.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vectordb"
MAX_LINES = 500

# Modules that need no ``__all__``: ``python -m vectordb`` is run, never imported from.
NO_ALL = {"vectordb.__main__"}

# try/except at module level (and, from Python 3.11, try/except*).
_TRY = (ast.Try, getattr(ast, "TryStar", ast.Try))

MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def top_level(tree: ast.Module) -> list[ast.stmt]:
    """The module's own statements, those inside a top-level ``if``/``try``/``with`` too
    (where a definition depends on an optional import), not those inside a def or class."""
    out: list[ast.stmt] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop(0)
        out.append(node)
        if isinstance(node, ast.If):
            todo[:0] = [*node.body, *node.orelse]
        elif isinstance(node, _TRY):
            handlers = [s for h in node.handlers for s in h.body]
            todo[:0] = [*node.body, *handlers, *node.orelse, *node.finalbody]
        elif isinstance(node, ast.With):
            todo[:0] = node.body
    return out


def is_empty(tree: ast.Module) -> bool:
    """Nothing but, at most, a docstring."""
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return not body


def declared_all(tree: ast.Module) -> list[str] | None:
    """The module's ``__all__`` as written (``__all__ += [...]`` included), or None when it
    has none."""
    found: list[str] | None = None
    for node in top_level(tree):
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign | ast.AugAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if not any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            continue
        try:
            names = ast.literal_eval(value)
        except ValueError:
            pytest.fail(f"line {node.lineno}: __all__ is not a literal list of strings")
        assert isinstance(names, list | tuple) and all(isinstance(n, str) for n in names), (
            f"line {node.lineno}: __all__ is not a list of strings"
        )
        extend = isinstance(node, ast.AugAssign) and found is not None
        found = [*(found or []), *names] if extend else list(names)
    return found


def public_definitions(tree: ast.Module) -> dict[str, int]:
    """Public classes and functions defined by the module itself: name -> line."""
    return {
        node.name: node.lineno
        for node in top_level(tree)
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and not node.name.startswith("_")
    }


@pytest.mark.parametrize("path", MODULES, ids=rel)
def test_module_is_short(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{rel(path)} has {lines} lines (at most {MAX_LINES})"


@pytest.mark.parametrize("path", MODULES, ids=rel)
def test_all_is_honest(path: Path) -> None:
    name = module_name(path)
    if name in NO_ALL:
        pytest.skip(f"{name} is run, not imported from")
    tree = parse(path)
    names = declared_all(tree)
    if names is None:
        if path.name == "__init__.py" and is_empty(tree):
            pytest.skip(f"{rel(path)} is an empty package __init__")
        pytest.fail(f"{rel(path)} has no __all__")

    problems: list[str] = []
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        problems.append(f"listed more than once in __all__: {duplicated}")

    unlisted = {n: line for n, line in public_definitions(tree).items() if n not in names}
    if unlisted:
        problems.append(
            "public classes/functions defined here but not in __all__: "
            + ", ".join(f"{n} (line {line})" for n, line in sorted(unlisted.items()))
        )

    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        # An adapter's framework (an optional extra) is not installed: the names cannot be
        # looked up, but what the source says was still checked above.
        if error.name is None or error.name.split(".")[0] == "vectordb":
            raise
        assert not problems, f"{rel(path)}: " + "; ".join(problems)
        pytest.skip(f"{name} needs {error.name}, not installed")
    missing = sorted(n for n in set(names) if not hasattr(module, n))
    if missing:
        problems.append(f"in __all__ but not in the module: {missing}")

    assert not problems, f"{rel(path)}: " + "; ".join(problems)


def test_import_contracts() -> None:
    """``lint-imports`` (import-linter, in the ``test`` extra) keeps every contract of
    ``[tool.importlinter]`` in pyproject.toml."""
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.skip(f"lint-imports is not installed next to {sys.executable} (import-linter)")
    result = subprocess.run(
        [str(exe), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout
