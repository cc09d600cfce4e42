"""hermes-ort: run Transformer models larger than memory by streaming per-block ONNX sessions.

import hermes_ort
model = hermes_ort.load("models/bert-base", memory_budget="200MB", strategy="pipeload")
outputs = model.run({"input_ids": ids, "attention_mask": mask})
model.stats   # per-block load/run times, peak resident bytes, bytes read
model.close()

The package in layers, one subpackage each, bottom to top (a module imports only from its own
subpackage or those below it; tests/test_layers.py checks it by folder):
- core: errors, units, choices (enums), machine, settings, manifest, stats, trace
- tensors: inputs, dataflow, kv_cache, batch
- planning: strategies, layer_profile, cost_model, schedule, page_cache, plan, pipeline_planner;
  generation: token_loop, tokenizer (both free of ONNX Runtime, like the two below them)
- streaming: memory, readahead, external_data, integrity, sessions, loader, daemon,
  block_engine, whole_engine (the PIPELOAD mechanism)
- measure: profiler, calibrate, fresh_process
- runtime: model (HermesModel), model_planner, load_options, tasks (chat, embed), protocol
- cluster: several boards on Ray (only with `cluster=`)
- api: loading (`load`)
- cli: the `hermes-ort` command and the demo
The exporter is `hermes_ort.export` (torch, transformers, optimum: the `export` extra); the
presets it builds are package data in `hermes_ort/presets/`.

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
    "Model": "hermes_ort.runtime.protocol",
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
    "Model",
    "ManifestError",
    "OptionError",
    "Plan",
    "ProfileError",
    "RunFailed",
    "TokenizerError",
    "load",
    "load_manifest",
]
