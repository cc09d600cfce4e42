"""The benchmarks (`python -m bench ...`, from the repository; not in the runtime's wheel).

`python -m bench matrix`: models x strategies x budgets x device profiles, each configuration in
fresh processes under an emulated edge board; JSON, a Markdown table, PNG plots (bench/results/).
The other commands (generation, sweep, objectives, verify-cost, export-memory) measure one thing
each, on the same child-process protocol (hermes_ort/measure/fresh_process.py, children in
bench/child.py).

One module per concept: matrix (axes, named matrices), cgroups (cgroup v1 groups), device
(emulating a board around one child), child (what runs in each fresh process), models (export,
profile, describe), runner (the matrix), records (samples, medians, floors, ratios, the JSON),
render (Markdown), plots (PNG), progress, cli. Nothing heavy is imported here: the children
import this package too."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """The environment of a bench child: this repository importable (`python -m bench.child`)."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}
