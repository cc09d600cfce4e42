"""The strategies: pipeload and the baselines every benchmark carries (docs/design.md §1); this is
the one place that decides which engine, which file and which session settings a strategy uses;
the planner writes that into the plan, and nothing downstream asks for a strategy's name.

- full: one ORT session of the whole model, default options: load all, then run (ONNX Runtime,
  optimum)
- full-mmap: one session, external data mmapped, prepacking off: the OS pages weights in and out
  (llama.cpp's mmap)
- pipeswitch: per-block sessions loaded in order by one loader, overlapped, all kept (PipeSwitch)
- ondemand: load a block, run it, free it; no overlap, optionally 1-ahead prefetch (AirLLM)
- pipeload: k loading agents, window w, the daemon frees; k, w from the planner (Hermes)

The per-block baselines load each block the way ORT does by default (load path "default":
prepacking on, no read-ahead) or, for the ablations, on pipeload's path ("stream": weights mmapped,
no prepacking, read-ahead). Whatever the strategy, MatMulNBits weights (int4, int8 nbits) are
opened prepacked: their fast kernel reads only the packed layout."""

from __future__ import annotations

from dataclasses import dataclass

from hermes_ort.core.choices import Engine, LoadPath, Residency, StrategyName, choose
from hermes_ort.core.errors import ManifestError
from hermes_ort.core.manifest import FileSpec, FullModelSpec, Manifest
from hermes_ort.core.settings import ORT_DEFAULT, STREAMING, WHOLE_MMAP, SessionSettings


@dataclass(frozen=True)
class Strategy:
    name: StrategyName
    engine: Engine
    residency: Residency | None  # blocks kept between passes (None: the whole engine's one file)
    about: str  # the reason a plan of it gives
    whole_settings: SessionSettings | None = None  # the whole engine's session
    prefers_mmap_file: bool = False  # the whole model with its weights in a data file


STRATEGIES: dict[StrategyName, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            StrategyName.PIPELOAD,
            Engine.BLOCKS,
            Residency.PLANNED,
            "the planner's loaders, window and kept blocks",
        ),
        Strategy(
            StrategyName.FULL,
            Engine.WHOLE,
            None,
            "one ONNX Runtime session of the whole model",
            ORT_DEFAULT,
        ),
        Strategy(
            StrategyName.FULL_MMAP,
            Engine.WHOLE,
            None,
            "one session of the whole model, its weights mmapped",
            WHOLE_MMAP,
            prefers_mmap_file=True,
        ),
        Strategy(
            StrategyName.PIPESWITCH,
            Engine.BLOCKS,
            Residency.ALL,
            "blocks loaded in order by one loader and all kept resident (PipeSwitch)",
        ),
        Strategy(
            StrategyName.ONDEMAND,
            Engine.BLOCKS,
            Residency.NONE,
            "load, run, free each block (AirLLM)",
        ),
    )
}
# load path -> (how a baseline's block sessions are opened, whether they are read ahead)
LOAD_PATHS: dict[LoadPath, tuple[SessionSettings, bool]] = {
    LoadPath.DEFAULT: (ORT_DEFAULT, False),
    LoadPath.STREAM: (STREAMING, True),
}


def get_strategy(name: str) -> Strategy:
    return STRATEGIES[choose(StrategyName, name, "strategy")]


def block_loading(load_path: str) -> tuple[SessionSettings, bool]:
    """(session settings, read ahead?) of a per-block baseline's blocks."""
    return LOAD_PATHS[choose(LoadPath, load_path, "load_path")]


def whole_model_file(manifest: Manifest, strategy: Strategy) -> FullModelSpec:
    """The whole-model file a "whole" strategy opens: `full` the file as users get it (weights
    inside below 2 GB), `full-mmap` the one with an external data file (older exports: the
    other)."""
    spec = (manifest.full_model_mmap if strategy.prefers_mmap_file else None) or manifest.full_model
    if spec is None:
        raise ManifestError(
            f"'{manifest.name}' has no whole-model file: strategy '{strategy.name}' opens one "
            f"(export with --full-model; a streaming export writes none)"
        )
    return spec


def opened_graphs(manifest: Manifest, strategy: Strategy) -> list[tuple[str, tuple[FileSpec, ...]]]:
    """(.onnx path, the files it opens) of everything a strategy opens."""
    if strategy.engine == Engine.WHOLE:
        spec = whole_model_file(manifest, strategy)
        return [(spec.path, spec.files)]
    return [(b.path, b.files) for b in manifest.blocks]
