"""The Python API: `hermes_ort.load(model_dir, memory_budget=..., strategy=...)`."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from hermes_ort.costmodel import CostModel
from hermes_ort.engine import BlockEngine, FullEngine
from hermes_ort.errors import HermesError
from hermes_ort.inputs import check_inputs, sample_inputs
from hermes_ort.integrity import verify_model
from hermes_ort.manifest import Manifest, load_manifest
from hermes_ort.memory import rss_bytes
from hermes_ort.planner import Plan, check_budget, plan_strategy
from hermes_ort.profiler import ensure_profile, load_profile
from hermes_ort.stats import RunStats
from hermes_ort.units import parse_bytes


def output_bytes(manifest: Manifest) -> int:
    """Bytes of the model's outputs at the manifest's sample shape."""
    sizes = {"batch_size": 1, **manifest.sample}
    total = 0
    for spec in manifest.outputs:
        count = 1
        for d in spec.shape:
            count *= d if isinstance(d, int) and d > 0 else int(sizes.get(str(d), 1))
        total += count * np.dtype(spec.dtype).itemsize
    return total


class HermesModel:
    """A model directory opened for inference under a plan. Use `run`, read `stats`, then `close`
    (or use it as a context manager). `run` calls from several threads are serialised."""

    def __init__(self, model_dir: Path, manifest: Manifest, plan: Plan, cost: CostModel):
        self.model_dir = model_dir
        self.manifest = manifest
        self.plan = plan
        self.cost = cost
        self.stats: RunStats | None = None
        self._engine = (
            FullEngine(model_dir, manifest, plan)
            if plan.whole_model
            else BlockEngine(model_dir, manifest, plan)
        )
        self._lock = threading.Lock()
        self._closed = False

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass. `inputs`: name -> numpy array, as `manifest.inputs` describes.
        Returns name -> numpy array for every model output; `self.stats` describes the pass."""
        feeds = check_inputs(self.manifest, inputs)
        with self._lock:
            if self._closed:
                raise HermesError(f"model '{self.model_dir}' is closed")
            outputs, self.stats = self._engine.run(feeds)
        return outputs

    def sample_inputs(
        self, batch_size: int = 1, sequence_length: int | None = None, seed: int = 0
    ) -> dict[str, np.ndarray]:
        return sample_inputs(self.manifest, batch_size, sequence_length, seed)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._engine.close()

    def __enter__(self) -> HermesModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HermesModel('{self.model_dir}', {self.plan.strategy}, {len(self.manifest.blocks)} blocks)"


def cost_model(model_dir: Path, manifest: Manifest, profile: bool | None, cold: bool) -> CostModel:
    """Measured costs when a profile exists (or is asked for), else estimates from file sizes."""
    stored = None
    if profile is not False:
        stored = ensure_profile(model_dir) if profile else load_profile(model_dir)
    if stored is not None:
        return CostModel.from_profile(manifest, stored, rss_bytes(), cold)
    return CostModel.estimate(manifest, rss_bytes(), output_bytes(manifest))


def load(
    model_dir: str | Path,
    memory_budget: int | str | None = None,
    strategy: str = "pipeload",
    loaders: int | None = None,
    window: int | None = None,
    load_path: str = "default",
    profile: bool | None = None,
    verify: str = "once",
) -> HermesModel:
    """Open an exported model directory.

    memory_budget: bytes or a string ("512MB", "1.5GiB"); "min" = the smallest workable budget;
        None = no limit. Bounds the process's peak resident memory (RSS) during `run`; a budget
        too small for the largest block is refused, naming it and the smallest workable budget.
    strategy: "pipeload" (default) or a baseline: "full", "full-mmap", "pipeswitch", "ondemand".
    loaders, window: override the planner's number of loading agents and window.
    load_path: for the per-block baselines, "default" (ORT's default load: prepacking on) or
        "stream" (pipeload's: weights mmapped, no prepacking, read-ahead) for ablations.
    profile: None = plan with the stored profile (`hermes-ort profile`) if it matches this machine,
        else with estimates from file sizes; True = measure one now if missing; False = estimates.
        strategy="auto" is "pipeload" with profile=True.
    verify: "once" (default) = the sha256 of every file the strategy opens is checked before its
        first use, then cached by size, times and inode (in `verified.json`); "size" = sizes only
        (a damaged file of the right size then goes unnoticed). Both refuse paths and external
        data that leave the model directory. See docs/reliability.md.
    """
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    verify_model(model_dir, manifest, strategy, verify)
    smallest = isinstance(memory_budget, str) and memory_budget.strip().lower() == "min"
    budget = None if smallest else parse_bytes(memory_budget)
    if strategy == "auto":
        strategy, profile = "pipeload", True if profile is None else profile
    cost = cost_model(model_dir, manifest, profile, cold=budget is not None or smallest)
    if smallest:  # the least memory that works, as the cost model predicts it
        budget = cost.min_budget()
    if strategy not in ("full", "full-mmap"):
        check_budget(cost, budget, tuple(b.name for b in manifest.blocks))
    plan = plan_strategy(
        strategy, cost, budget, load_path=load_path, loaders=loaders, window=window
    )
    return HermesModel(model_dir, manifest, plan, cost)
