"""hermes-ort: run Transformer models larger than memory by streaming per-block ONNX sessions.

import hermes_ort
model = hermes_ort.load("models/bert-base", memory_budget="200MB", strategy="pipeload")
outputs = model.run({"input_ids": ids, "attention_mask": mask})
model.stats   # per-block load/run times, peak resident bytes, bytes read
model.close()

The package in layers (each module imports only from its own layer or those above it here):
- data and arithmetic, no ONNX Runtime: errors, units, machine, pagecache, manifest, settings,
  strategies, profile, timeline, costmodel, plan, planner, batch, dataflow, inputs, decoder,
  stats, trace, generate, stagespec, stages
- mechanism: memory, readahead, external_data, integrity, sessions, loader, daemon, engine,
  whole_engine
- measurement: profiler, calibrate, fresh
- the API: planning, model, stage, cluster (Ray, only with `cluster=`), api, tokenizer, cli,
  cli_generate, demo

Importing the package is light (the errors only); ONNX Runtime loads with the first name that
needs it (`load`, `HermesModel`), so a tool importing one module of the data layer stays small.
"""

from importlib import import_module

from hermes_ort.core.errors import (
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

__version__ = "0.1.0"

_LAZY = {
    "HermesModel": "hermes_ort.runtime.model",
    "load": "hermes_ort.api.loading",
    "Manifest": "hermes_ort.core.manifest",
    "load_manifest": "hermes_ort.core.manifest",
    "Plan": "hermes_ort.planning.plan",
    "STRATEGIES": "hermes_ort.planning.strategies",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hermes_ort' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)


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
