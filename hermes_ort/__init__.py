"""hermes-ort: run Transformer models larger than memory by streaming per-block ONNX sessions.

import hermes_ort
model = hermes_ort.load("models/bert-base", memory_budget="200MB", strategy="pipeload")
outputs = model.run({"input_ids": ids, "attention_mask": mask})
model.stats   # per-block load/run times, peak resident bytes, bytes read
model.close()

The package in layers (each module imports only from its own layer or those above it here):
- data and arithmetic, no ONNX Runtime: errors, units, machine, manifest, settings, strategies,
  profile, timeline, costmodel, plan, planner, dataflow, inputs, decoder, stats, generate
- mechanism: memory, readahead, external_data, integrity, sessions, loader, daemon, engine,
  whole_engine
- measurement: profiler, calibrate, fresh
- the API: model, tokenizer, cli, cli_generate, demo
"""

from hermes_ort.errors import (
    BudgetError,
    ChildFailed,
    HermesError,
    InputError,
    IntegrityError,
    LoadError,
    ManifestError,
    OptionError,
    ProfileError,
    RunFailed,
    TokenizerError,
)
from hermes_ort.manifest import Manifest, load_manifest
from hermes_ort.model import HermesModel, load
from hermes_ort.plan import Plan
from hermes_ort.strategies import STRATEGIES

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "BudgetError",
    "ChildFailed",
    "HermesError",
    "HermesModel",
    "InputError",
    "IntegrityError",
    "LoadError",
    "Manifest",
    "ManifestError",
    "OptionError",
    "Plan",
    "ProfileError",
    "RunFailed",
    "TokenizerError",
    "load",
    "load_manifest",
]
