"""README.md and NOTES.md agree with the code: options, make targets, paths, tests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rawproxy.cli import build_parser

REPO = Path(__file__).resolve().parent.parent.parent
DOCS = ("README.md", "NOTES.md")


def read(name: str) -> str:
    return (REPO / name).read_text()


def readme_options_block() -> str:
    text = read("README.md")
    section = text[text.index("## Options"):text.index("## Operating it")]
    return section[section.index("```") + 3:section.rindex("```")]


def test_readme_lists_exactly_the_options_the_cli_has() -> None:
    cli = {opt for action in build_parser()._actions for opt in action.option_strings
           if opt.startswith("--") and opt != "--help"}
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", readme_options_block()))
    assert documented == cli


@pytest.mark.parametrize("doc", DOCS)
def test_make_targets_named_in_the_docs_exist(doc: str) -> None:
    makefile = read("Makefile")
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, re.MULTILINE))
    named = set(re.findall(r"`make ([a-z][a-z0-9-]*)", read(doc)))
    assert named, f"{doc} names no make target"
    assert named <= targets


@pytest.mark.parametrize("doc", DOCS)
def test_repository_paths_named_in_the_docs_exist(doc: str) -> None:
    paths = set(re.findall(
        r"(?<![\w/.])((?:rawproxy|probe|benchmarks|tests|contrib)/[\w./-]*[\w/])", read(doc)))
    assert paths, f"{doc} names no path"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing


@pytest.mark.parametrize("doc", DOCS)
def test_test_names_cited_in_the_docs_exist(doc: str) -> None:
    cited = set(re.findall(r"`(test_\w+)`", read(doc)))
    defined = {name for path in (REPO / "tests").rglob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.MULTILINE)}
    assert cited <= defined


def test_readme_layout_names_every_module() -> None:
    """README's Layout section is the map of the tree: a module added
    without a line there is a module nobody can find (issue #11)."""
    readme = read("README.md")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    modules = sorted(path.name for path in (REPO / "rawproxy").glob("*.py")
                     if not path.name.startswith("__"))
    assert modules, "no modules found: the test would pass vacuously"
    missing = [name for name in modules if name not in layout]
    assert not missing, f"README's Layout does not mention {missing}"
