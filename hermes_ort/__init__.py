"""hermes-ort: run Transformer models larger than memory by streaming per-block ONNX sessions.

import hermes_ort
model = hermes_ort.load("models/bert-base", memory_budget="200MB", strategy="pipeload")
outputs = model.run({"input_ids": ids, "attention_mask": mask})
model.stats   # per-block load/run times, peak resident bytes, bytes read
model.close()
"""

from hermes_ort.errors import (
    BudgetError,
    ExportError,
    HermesError,
    InputError,
    IntegrityError,
    LoadError,
    ManifestError,
)
from hermes_ort.manifest import Manifest, load_manifest
from hermes_ort.model import HermesModel, load
from hermes_ort.planner import STRATEGIES, Plan

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "BudgetError",
    "ExportError",
    "HermesError",
    "HermesModel",
    "InputError",
    "IntegrityError",
    "LoadError",
    "Manifest",
    "ManifestError",
    "Plan",
    "load",
    "load_manifest",
]
