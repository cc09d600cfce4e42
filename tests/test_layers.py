"""The runtime's structure: layers, each module importing only from its own layer or the ones
below (function-level imports included), no import cycle, the data and arithmetic modules free of
ONNX Runtime and psutil, and the runtime free of the exporter's dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

import hermes_ort

PACKAGE = Path(hermes_ort.__file__).parent
# bottom to top, as hermes_ort/__init__.py's docstring lists them
LAYERS = {
    "data": """errors units machine pagecache manifest settings strategies profile timeline
               costmodel plan planner batch dataflow inputs decoder stats trace generate
               stagespec stages""",
    "mechanism": """memory readahead external_data integrity sessions loader daemon engine
                    whole_engine""",
    "measurement": "profiler calibrate fresh",
    "api": """planning model stage cluster api tokenizer cli cli_generate cli_profile cli_cluster
              demo __init__ __main__""",
}
RANK = {m: rank for rank, names in enumerate(LAYERS.values()) for m in names.split()}
HEAVY = {"onnxruntime", "psutil"}
EXPORT_ONLY = {"torch", "transformers", "optimum", "onnx", "onnxscript", "accelerate"}


def imports(path: Path) -> set[str]:
    """Top-level names of everything a module imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def internal(names: set[str]) -> set[str]:
    out = set()
    for n in names:
        parts = n.split(".")
        if parts[0] == "hermes_ort" and len(parts) > 1 and parts[1] in RANK:
            out.add(parts[1])
    return out


MODULES = {p.stem: imports(p) for p in PACKAGE.glob("*.py")}


def test_every_module_has_a_layer_and_the_docs_list_it():
    assert set(MODULES) == set(RANK), set(MODULES) ^ set(RANK)
    doc = " ".join(hermes_ort.__doc__.split())
    for names in LAYERS.values():
        skip = {"cli_profile", "cli_cluster"}
        listed = [n for n in names.split() if not n.startswith("__") and n not in skip]
        assert ", ".join(listed[:3]) in doc


def test_modules_import_only_their_own_layer_or_below():
    for module, names in MODULES.items():
        for other in internal(names):
            assert RANK[other] <= RANK[module], f"{module} ({RANK[module]}) imports {other}"


def test_no_import_cycle():
    graph = {m: internal(n) - {m} for m, n in MODULES.items()}
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


def test_the_data_layer_reaches_neither_onnx_runtime_nor_psutil():
    def reach(m: str, seen: set[str]) -> set[str]:
        seen.add(m)
        heavy = {n.split(".")[0] for n in MODULES[m]} & HEAVY
        for other in internal(MODULES[m]) - seen:
            heavy |= reach(other, seen)
        return heavy

    for module in LAYERS["data"].split():
        assert not reach(module, set()), f"{module} reaches {reach(module, set())}"


def test_the_runtime_never_imports_the_exporter_or_the_benchmarks():
    for module, names in MODULES.items():
        tops = {n.split(".")[0] for n in names}
        assert not tops & (EXPORT_ONLY | {"bench"}), (module, tops & (EXPORT_ONLY | {"bench"}))
        # `export` only where the CLI hands the export subcommand over to it
        assert "export" not in tops or module == "cli", module


def test_only_the_cluster_module_imports_ray():
    """Ray is the `cluster` extra's: the runtime without it stays onnxruntime, numpy, psutil."""
    for module, names in MODULES.items():
        if module != "cluster":
            assert "ray" not in {n.split(".")[0] for n in names}, module
