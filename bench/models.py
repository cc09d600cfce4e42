"""The models of a bench: a preset name (exported into MODELS_DIR/NAME first if missing, by the
exporter in its own process: the runtime never imports torch) or an exported model directory;
its layer profile on this machine (`hermes-ort profile`, per core count: the planner's costs); and
what a fresh process sees of it (sizes, the planner's smallest workable budget)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import REPO, child_env
from bench.device import Emulation, Launch, run_under
from hermes_ort.core.manifest import MANIFEST_NAME, Manifest
from hermes_ort.measure.fresh_process import require, run_child
from hermes_ort.planning.strategies import get_strategy

REPO_PRESETS = REPO / "hermes_ort" / "presets"


@dataclass(frozen=True)
class ModelFacts:
    name: str  # as named in the matrix
    model_dir: Path
    family: str  # bert, vit, gpt2, ...
    model_bytes: int  # every block file once
    full_bytes: int | None  # the whole-model file(s) of `full`
    min_budget_bytes: int  # the planner's smallest workable budget, in a fresh process
    resident_peak_bytes: int  # the planner's predicted peak with every block resident
    cost_source: str  # "profile" (measured on this machine at these cores) or "estimate"
    profile_compute_s: float | None  # sum of the profile's per-block steady runs (a compute floor)
    blocks: int
    layers: int

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def model_dir_for(name: str, models_dir: Path) -> Path:
    """An exported directory as given, else MODELS_DIR/NAME (exported from the preset if needed)."""
    path = Path(name)
    if (path / MANIFEST_NAME).is_file():
        return path
    return models_dir / name


def ensure_exported(name: str, model_dir: Path, log=print) -> None:
    """Export preset `name` into `model_dir` unless it holds a model already."""
    if (model_dir / MANIFEST_NAME).is_file():
        return
    if "/" in name or not (REPO_PRESETS / f"{name}.json").is_file() and REPO_PRESETS.is_dir():
        known = sorted(p.stem for p in REPO_PRESETS.glob("*.json"))
        raise ValueError(
            f"'{name}' is neither an exported model directory nor a preset ({', '.join(known)})"
        )
    log(f"exporting preset '{name}' into {model_dir} (python -m hermes_ort.export) ...")
    cmd = [
        sys.executable,
        "-m",
        "hermes_ort.export",
        "--preset",
        name,
        "--out",
        str(model_dir),
        "--quiet",
        "--full-model",  # the full and full-mmap baselines open it
    ]
    what = f"export of '{name}' ({' '.join(cmd)})"
    require(run_child(cmd, timeout_s=3600, env=child_env()), what)


def model_files(manifest: Manifest, model_dir: Path, strategy: str | None = None) -> list[Path]:
    """Files a strategy opens (None: every file of the model, blocks and whole-model file)."""
    blocks = [model_dir / f.path for f in manifest.block_files().values()]
    full = [model_dir / f.path for f in manifest.full_model.files] if manifest.full_model else []
    if strategy is None:
        return blocks + full
    return full if get_strategy(strategy).engine == "whole" else blocks


def ensure_profile(
    model_dir: Path, emulation: Emulation, cores: int | None, timeout_s: float
) -> str:
    """`hermes-ort profile` pinned to these cores (the stored profile is per core count; it is
    measured again only when it does not match). Returns "" or why it failed."""
    cmd = [sys.executable, "-m", "hermes_ort", "profile", str(model_dir)]
    launch = Launch(Emulation(None, "", None, "", emulation.cpus), cores=cores, tag="profile")
    result = run_under(launch, cmd, timeout_s, tell_t0=False)
    return "" if result.ok else result.error


def describe(
    name: str, model_dir: Path, emulation: Emulation, cores: int | None, timeout_s: float
) -> ModelFacts:
    """Sizes and the smallest workable budget, seen by a fresh process pinned to these cores."""
    cmd = [sys.executable, "-m", "bench.child", "describe", str(model_dir)]
    launch = Launch(Emulation(None, "", None, "", emulation.cpus), cores=cores, tag="describe")
    data = require(run_under(launch, cmd, timeout_s), f"describing '{model_dir}'")
    return ModelFacts(
        name=name,
        model_dir=model_dir,
        family=data["family"],
        model_bytes=data["model_bytes"],
        full_bytes=data["full_bytes"],
        min_budget_bytes=data["min_budget_bytes"],
        resident_peak_bytes=data["resident_peak_bytes"],
        cost_source=data["cost_source"],
        profile_compute_s=data["profile_compute_s"],
        blocks=data["blocks"],
        layers=data["layers"],
    )
