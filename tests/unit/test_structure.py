"""The shape the code keeps as it grows (issue #11): small modules, short
functions, dependencies that point down, nothing that imports the CLI.

Read from the source with ``ast``, so a module that grows past its limit
fails here rather than in a review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "rawproxy"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 50
# The argument parser is one long declaration of options, read top to bottom.
LONG_FUNCTIONS_ALLOWED = {("cli.py", "build_parser")}
# Modules that only the command line itself may import.
ENTRY_MODULES = {"cli", "__main__"}


def _modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def _imported_siblings(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("rawproxy."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("rawproxy."))
    return names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_no_module_is_over_the_line_limit(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_no_function_is_over_the_line_limit(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    too_long = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and (path.name, node.name) not in LONG_FUNCTIONS_ALLOWED:
                too_long.append(f"{node.name} ({length} lines)")
    assert not too_long, f"{path.name}: {', '.join(too_long)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_nothing_imports_the_command_line(path: Path) -> None:
    if path.stem in ENTRY_MODULES:
        return
    imported = _imported_siblings(ast.parse(path.read_text(encoding="utf-8")))
    assert not imported & ENTRY_MODULES, f"{path.name} imports {imported & ENTRY_MODULES}"


def test_the_limits_are_checked_on_real_modules() -> None:
    # A glob that found nothing would make the tests above pass vacuously.
    names = {path.name for path in _modules()}
    assert {"config.py", "session.py", "server.py", "supervisor.py", "cli.py"} <= names
