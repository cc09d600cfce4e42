"""The docs say what the code is: every runtime module is in the README's table, every test the
docs name exists, every command the README gives is one the CLIs know."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_module_table_lists_every_runtime_module():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## How it works")[1].split("\n## ")[0]
    listed = set(re.findall(r"`(\w+)\.py`", table))
    modules = {p.stem for p in (ROOT / "hermes_ort").glob("*.py")} - {"__init__", "__main__"}
    assert listed == modules, f"missing {modules - listed}, stale {listed - modules}"


def test_every_test_the_docs_name_exists():
    tests = {
        (p.name, name)
        for p in (ROOT / "tests").rglob("test_*.py")
        for name in re.findall(r"^def (test_\w+)", p.read_text(), re.M)
    }
    for doc in DOCS:
        for file, name in re.findall(r"(test_\w+\.py)::(test_\w+)", doc.read_text()):
            assert (file, name) in tests, f"{doc.name} names {file}::{name}, which does not exist"


def test_the_bench_commands_the_docs_give_exist():
    from bench.cli import COMMANDS

    known = {"matrix", *COMMANDS}
    for doc in DOCS:
        for command in re.findall(r"python -m bench (\w[\w-]*)", doc.read_text()):
            assert command in known, f"{doc.name}: `python -m bench {command}` is no command"
        assert "hermes_ort.bench" not in doc.read_text(), doc.name


def test_code_comments_cite_sections_that_exist():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)", design, re.M))
    for path in [
        *ROOT.glob("hermes_ort/*.py"),
        *ROOT.glob("export/*.py"),
        *ROOT.glob("bench/*.py"),
    ]:
        for cited in re.findall(r"design\.md §(\d+(?:\.\d+)?)", path.read_text()):
            assert cited in sections, f"{path.name} cites docs/design.md §{cited}"
        assert "DESIGN.md" not in path.read_text(), path.name
