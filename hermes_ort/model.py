"""The Python API: `hermes_ort.load(model_dir, memory_budget=..., strategy=...)`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from hermes_ort.calibrate import ensure_profile
from hermes_ort.costmodel import CostModel
from hermes_ort.decoder import decoder_signature
from hermes_ort.engine import BlockEngine
from hermes_ort.errors import BudgetError, HermesError, InputError, OptionError
from hermes_ort.generate import (
    GenerationStats,
    Sampling,
    default_eos,
    generate_tokens,
    prompt_ids,
)
from hermes_ort.inputs import check_inputs, sample_inputs
from hermes_ort.integrity import Verifier, check_verify_mode
from hermes_ort.manifest import Manifest, load_manifest
from hermes_ort.plan import Plan
from hermes_ort.planner import check_budget, check_objective, plan_strategy
from hermes_ort.profile import read_profile
from hermes_ort.profiler import costs_now
from hermes_ort.stats import RunStats
from hermes_ort.strategies import block_loading, get_strategy, opened_graphs
from hermes_ort.units import format_bytes, parse_bytes
from hermes_ort.whole_engine import WholeEngine


class HermesModel:
    """A model directory opened for inference under a plan. Use `run`, read `stats`, then `close`
    (or use it as a context manager). `run` calls from several threads are serialised."""

    def __init__(
        self,
        manifest: Manifest,
        plan: Plan,
        cost: CostModel,
        verifier: Verifier,
        replan: Callable[[int], Plan] | None = None,
        smallest: bool = False,
    ):
        self.model_dir = verifier.model_dir
        self.manifest = manifest
        self.plan = plan
        self.cost = cost
        self.verifier = verifier  # the hashes this model has checked
        self.stats: RunStats | None = None
        self.generation_stats: GenerationStats | None = None
        self.decoder = decoder_signature(manifest)
        self._engine = make_engine(manifest, plan, verifier)
        self._replan = replan  # budget for the blocks -> plan (to make room for a KV cache)
        self._blocks_budget = plan.budget_bytes
        self._smallest = smallest  # the budget is "min"
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

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        streamer: Callable[[int], Any] | None = None,
    ) -> np.ndarray:
        """Generate up to `max_new_tokens` after the prompt `input_ids` (a list, [T] or [1, T]);
        returns the prompt and the new ids, in the prompt's form ([T + N] or [1, T + N]). Greedy
        unless do_sample. eos_token_id: stop ids (default: the model's generation_config.json; []
        for none). streamer(token_id) is called as each token is chosen. `generation_stats`
        describes the call. Under a memory budget, the KV cache of the prompt plus max_new_tokens
        is reserved first and the blocks are planned in what is left."""
        if self.decoder is None:
            raise HermesError(
                f"model '{self.model_dir}' has no KV cache inputs (past_key_values.*): export a "
                f"decoder with its cache (the default; not --no-kv-cache) to generate"
            )
        ids = prompt_ids(input_ids)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        total = ids.shape[1] + max_new_tokens
        limit = self.decoder.max_positions
        if limit and total > limit:
            raise InputError(
                f"prompt of {ids.shape[1]} tokens + max_new_tokens {max_new_tokens} = {total} "
                f"positions, more than the model supports ({limit})"
            )
        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        sampling.check()
        if eos_token_id is None:
            eos = default_eos(self.model_dir)
        else:
            eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
        with self._lock:
            if self._closed:
                raise HermesError(f"model '{self.model_dir}' is closed")
            self._reserve_cache(self.decoder.cache_bytes(total))

            def run(feeds):
                outputs, self.stats = self._engine.run(check_inputs(self.manifest, feeds))
                return outputs, self.stats

            new, self.generation_stats = generate_tokens(
                run, self.decoder, ids, max_new_tokens, sampling, eos, streamer
            )
        out = np.concatenate([ids, np.array([new], np.int64)], axis=1)
        return out if np.ndim(input_ids) == 2 else out[0]

    def _reserve_cache(self, cache_bytes: int) -> None:
        """Re-plan the blocks in the budget minus the KV cache, when that changes the plan. The
        plan keeps the user's budget: its predicted peak is the blocks' (cache excluded)."""
        budget = self.plan.budget_bytes
        if self._replan is None or budget is None or self.plan.engine == "whole":
            return
        if self._smallest:  # "min": the smallest budget of the blocks, plus this cache
            budget = self.cost.min_budget() + cache_bytes
        blocks_budget = budget - cache_bytes
        if self._blocks_budget == blocks_budget and self.plan.budget_bytes == budget:
            return
        try:
            plan = replace(self._replan(blocks_budget), budget_bytes=budget)
        except BudgetError as e:
            raise BudgetError(
                f"memory budget {format_bytes(budget)} minus the KV cache of this generation "
                f"({format_bytes(cache_bytes)}) is too small for the blocks: {e}"
            ) from None
        if replace(plan, budget_bytes=None) != replace(self.plan, budget_bytes=None):
            self._engine.close()  # resident sessions of the old plan go; the new plan opens its own
            self._engine = make_engine(self.manifest, plan, self.verifier)
        self.plan = plan
        self._blocks_budget = blocks_budget

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
        blocks = len(self.manifest.blocks)
        return f"HermesModel('{self.model_dir}', {self.plan.strategy}, {blocks} blocks)"


def make_engine(manifest: Manifest, plan: Plan, verifier: Verifier) -> BlockEngine | WholeEngine:
    """The engine the plan names."""
    if plan.engine == "whole":
        return WholeEngine(manifest, plan, verifier)
    return BlockEngine(manifest, plan, verifier)


def load(
    model_dir: str | Path,
    memory_budget: int | str | None = None,
    strategy: str = "pipeload",
    loaders: int | None = None,
    window: int | None = None,
    load_path: str = "default",
    profile: bool | None = None,
    verify: str = "once",
    objective: str = "repeated",
) -> HermesModel:
    """Open an exported model directory.

    memory_budget: bytes or a string ("512MB", "1.5GiB"); "min" = the smallest workable budget;
        None = no limit. Bounds the process's peak resident memory (RSS) during `run`; a budget
        too small for the largest block is refused, naming it and the smallest workable budget.
    strategy: "pipeload" (default) or a baseline: "full", "full-mmap", "pipeswitch", "ondemand"
        (strategies.py).
    loaders, window: override the planner's number of loading agents and window.
    load_path: for the per-block baselines, "default" (ORT's default load: prepacking on) or
        "stream" (pipeload's: weights mmapped, no prepacking, read-ahead) for ablations.
    profile: None = plan with the stored profile (`hermes-ort profile`) if it matches this machine,
        else with estimates from file sizes; True = measure one now if missing; False = estimates.
    verify: "once" (default) = the sha256 of every file the strategy opens is checked before its
        first use, then cached by size, times and inode (in `verified.json`); "size" = sizes only
        (a damaged file of the right size then goes unnoticed). Both refuse paths and external
        data that leave the model directory. See docs/reliability.md.
    objective: what pipeload's plan makes fastest: "repeated" (default) = later passes (a model
        loaded once and run many times); "one-shot" = the first pass (load, run once, close).
    """
    spec = get_strategy(strategy)  # every option is checked before any file is read
    block_loading(load_path)
    check_objective(objective)
    check_verify_mode(verify)
    for name, value in (("loaders", loaders), ("window", window)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise OptionError(f"{name} must be a whole number of at least 1, got {value!r}")
    smallest = isinstance(memory_budget, str) and memory_budget.strip().lower() == "min"
    budget = None if smallest else parse_bytes(memory_budget)
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    verifier = Verifier(model_dir, verify)
    verifier.check_graphs(opened_graphs(manifest, spec))
    stored = None
    if profile is not False:
        stored = ensure_profile(model_dir) if profile else read_profile(model_dir)
    cost = costs_now(model_dir, manifest, stored, cold=budget is not None or smallest)
    if smallest:  # the least memory that works, as the cost model predicts it
        budget = cost.min_budget()
    names = tuple(b.name for b in manifest.blocks)

    def make_plan(budget: int | None) -> Plan:
        if spec.engine == "blocks":
            check_budget(cost, budget, names)
        return plan_strategy(
            strategy,
            cost,
            budget,
            load_path=load_path,
            loaders=loaders,
            window=window,
            objective=objective,
            manifest=manifest,
        )

    plan = make_plan(budget)
    return HermesModel(manifest, plan, cost, verifier, replan=make_plan, smallest=smallest)
