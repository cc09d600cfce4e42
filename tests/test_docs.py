"""The docs say what the code is: the README's table names every subpackage and docs/design.md
every module, every test, file, link and command the docs give exists, and the README stays a
one-screen front door."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 20_480


def test_the_readme_table_lists_every_subpackage():
    section = README.read_text().split("## How it works")[1].split("\n## ")[0]
    listed = set(re.findall(r"^\| `(\w+)/` \|", section, re.M))
    folders = {p.parent.name for p in (ROOT / "hermes_ort").glob("*/__init__.py")}
    assert listed == folders, f"missing {folders - listed}, stale {listed - folders}"


def test_the_readme_is_one_screen():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move narrative to docs/"


def anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to -."""
    headings = re.findall(r"^#+ (.+)$", doc.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_points_at_a_file():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            assert path.exists(), f"{doc.name} links to {target}, which does not exist"
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path), f"{doc.name} links to {target}: no such heading"


def test_every_source_path_the_docs_name_exists():
    """`hermes_ort/...`, `bench/...`, `tests/...` and `arm/...` paths, and paths inside the runtime
    written from its root (`streaming/loader.py`): a renamed module leaves no stale name behind."""
    folders = {p.parent.name for p in (ROOT / "hermes_ort").glob("*/__init__.py")}
    for doc in DOCS:
        for path in re.findall(r"`([\w/.-]+\.(?:py|sh))`", doc.read_text()):
            top = path.split("/")[0]
            if top in {"hermes_ort", "bench", "tests", "arm"}:
                assert (ROOT / path).is_file(), f"{doc.name} names {path}, which does not exist"
            elif top in folders:
                assert (ROOT / "hermes_ort" / path).is_file(), f"{doc.name} names {path}"
        # module tables: | `streaming/` | `loader.py` | ...
        for folder, cell in re.findall(r"^\| `(\w+)/` \| ([^|]+) \|", doc.read_text(), re.M):
            for name in re.findall(r"`(\w+\.py)`", cell):
                path = ROOT / "hermes_ort" / folder / name
                assert path.is_file(), f"{doc.name} lists {folder}/{name}, which does not exist"


def test_the_design_doc_maps_every_runtime_module():
    design = (ROOT / "docs" / "design.md").read_text()
    table = design.split("## 6. Where each part lives")[1].split("\n## ")[0]
    listed = {
        f"{folder}/{name}"
        for folder, cell in re.findall(r"^\| `(\w+)/` \| ([^|]+) \|", table, re.M)
        for name in re.findall(r"`(\w+)\.py`", cell)
    }
    modules = {
        f"{p.parent.name}/{p.stem}"
        for p in (ROOT / "hermes_ort").glob("*/*.py")
        if p.parent.name not in {"export", "presets"} and not p.stem.startswith("__")
    }
    assert listed == modules, f"design.md §6: missing {modules - listed}, stale {listed - modules}"


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


def code(text: str) -> list[str]:
    """The code in a Markdown page: each line of its fenced blocks, and each inline code span."""
    fenced = re.findall(r"^```\w*\n(.*?)^```", text, re.M | re.S)
    rest = re.sub(r"^```\w*\n.*?^```", "", text, flags=re.M | re.S)
    return [line for block in fenced for line in block.splitlines()] + [
        " ".join(span.split()) for span in re.findall(r"`([^`]+)`", rest)
    ]


def test_the_hermes_ort_commands_the_docs_give_exist():
    from hermes_ort.cli.main import build_parser

    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for doc in DOCS:
        for snippet in code(doc.read_text()):
            for call in re.split(r"(?<![\w./-])hermes-ort (?=[a-z])", snippet)[1:]:
                names, _, args = call.split("#")[0].partition(" ")
                for name in names.split("|"):
                    assert name in commands.choices, f"{doc.name}: no command `hermes-ort {name}`"
                    known = commands.choices[name]._option_string_actions
                    for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", args):
                        assert option in known, f"{doc.name}: `hermes-ort {name}` has no {option}"


def test_code_comments_cite_sections_that_exist():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)", design, re.M))
    for path in [*(ROOT / "hermes_ort").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]:
        for cited in re.findall(r"design\.md §(\d+(?:\.\d+)?)", path.read_text()):
            assert cited in sections, f"{path.name} cites docs/design.md §{cited}"
        assert "DESIGN.md" not in path.read_text(), path.name
