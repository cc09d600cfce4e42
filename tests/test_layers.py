"""The runtime's structure, by folder: each subpackage of `hermes_ort` is a layer, and a module
imports only from its own subpackage or the ones below it (function-level imports included);
no import cycle; the layers below `streaming` reach neither ONNX Runtime nor psutil; the runtime
never imports the exporter's dependencies; only the cluster imports Ray."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import hermes_ort

PACKAGE = Path(hermes_ort.__file__).parent
# bottom to top; a subpackage's docstring says what it may import
LAYERS = (
    "core",
    "tensors",
    "planning generation",
    "streaming",
    "measure",
    "runtime",
    "cluster",
    "api",
    "serve",
    "cli",
)
RANK = {folder: rank for rank, names in enumerate(LAYERS) for folder in names.split()}
TOP = len(LAYERS)  # the package's own __init__ / __main__
PURE = {"core", "tensors", "planning", "generation"}  # no ONNX Runtime, no psutil
HEAVY = {"onnxruntime", "psutil"}
EXPORT_ONLY = {"torch", "transformers", "optimum", "onnx", "onnxscript", "accelerate"}
NOT_LAYERS = {"export", "presets"}  # the exporter (its own tool), package data


def imports(path: Path) -> set[str]:
    """Dotted names of everything a module imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def folder_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


RUNTIME = {
    module_name(p): imports(p)
    for p in PACKAGE.rglob("*.py")
    if p.relative_to(PACKAGE).parts[0] not in NOT_LAYERS
}


def internal(names: set[str]) -> set[str]:
    """The runtime modules among imported names (a `from pkg import mod` names the module)."""
    return {n for n in names if n in RUNTIME and n != "hermes_ort"}


def rank(module: str) -> int:
    folder = folder_of(module)
    return TOP if folder is None else RANK[folder]


def test_every_module_sits_in_a_layer_and_every_layer_says_what_it_may_import():
    top_level = {p.stem for p in PACKAGE.glob("*.py")}
    assert top_level == {"__init__", "__main__"}, f"modules outside a layer: {top_level}"
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(RANK) | NOT_LAYERS, folders ^ (set(RANK) | NOT_LAYERS)
    for folder in RANK:
        doc = importlib.import_module(f"hermes_ort.{folder}").__doc__
        assert doc and "May import" in doc, f"hermes_ort/{folder}/__init__.py"


def test_modules_import_only_their_own_layer_or_below():
    for module, names in RUNTIME.items():
        for other in internal(names):
            assert rank(other) <= rank(module), f"{module} imports {other}, a layer above it"


def test_no_import_cycle():
    graph = {m: internal(n) - {m} for m, n in RUNTIME.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for other in graph[m]:
            assert state.get(other) != 1, "cycle: " + " -> ".join([*path, m, other])
            if other not in state:
                visit(other, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_the_pure_layers_reach_neither_onnx_runtime_nor_psutil():
    def reach(m: str, seen: set[str]) -> set[str]:
        seen.add(m)
        heavy = {n.split(".")[0] for n in RUNTIME[m]} & HEAVY
        for other in internal(RUNTIME[m]) - seen:
            heavy |= reach(other, seen)
        return heavy

    for module in RUNTIME:
        if folder_of(module) in PURE:
            assert not reach(module, set()), f"{module} reaches {reach(module, set())}"


def test_the_runtime_never_imports_the_exporter_or_the_benchmarks():
    for module, names in RUNTIME.items():
        tops = {n.split(".")[0] for n in names}
        assert not tops & (EXPORT_ONLY | {"bench"}), (module, tops & (EXPORT_ONLY | {"bench"}))
        exporter = {n for n in names if n.startswith("hermes_ort.export")}
        # only where the CLI hands the export subcommand over to it
        assert not exporter or module == "hermes_ort.cli.main", (module, exporter)


def test_only_the_cluster_imports_ray():
    """Ray is the `cluster` extra's: the runtime without it stays onnxruntime, numpy, psutil."""
    for module, names in RUNTIME.items():
        if folder_of(module) != "cluster":
            assert "ray" not in {n.split(".")[0] for n in names}, module
