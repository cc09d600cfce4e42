"""The Python API: `hermes_ort.load(model_dir, memory_budget=..., strategy=...)`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from hermes_ort.core.errors import BudgetError, HermesError, OptionError
from hermes_ort.core.manifest import Manifest, load_manifest
from hermes_ort.core.stats import RunStats
from hermes_ort.core.trace import Trace, chrome_trace
from hermes_ort.core.units import format_bytes, parse_bytes
from hermes_ort.generation.token_loop import (
    GenerationStats,
    Sampling,
    as_given,
    generate_tokens,
    generation_request,
)
from hermes_ort.measure.calibrate import ensure_profile
from hermes_ort.planning.cost_model import CostModel
from hermes_ort.planning.layer_profile import read_profile
from hermes_ort.planning.page_cache import (
    check_policy,
)
from hermes_ort.planning.pipeline_planner import (
    check_objective,
)
from hermes_ort.planning.plan import Plan
from hermes_ort.planning.strategies import block_loading, get_strategy, opened_graphs
from hermes_ort.runtime.model_planner import ModelPlanner, PlanOptions
from hermes_ort.streaming.block_engine import BlockEngine
from hermes_ort.streaming.integrity import Verifier, check_verify_mode
from hermes_ort.streaming.whole_engine import WholeEngine
from hermes_ort.tensors.batch import BatchShape, batch_shape, sample_shape
from hermes_ort.tensors.inputs import check_inputs, sample_inputs
from hermes_ort.tensors.kv_cache import decoder_signature


class HermesModel:
    """A model directory opened for inference under a plan. Use `run`, read `stats`, then `close`
    (or use it as a context manager). `run` calls from several threads are serialised."""

    def __init__(
        self,
        manifest: Manifest,
        plan: Plan,
        cost: CostModel,
        verifier: Verifier,
        replan: Callable[..., Plan] | None = None,
        smallest: bool = False,
        trace: Trace | None = None,
    ):
        self.model_dir = verifier.model_dir
        self.manifest = manifest
        self.plan = plan
        self.cost = cost
        self.verifier = verifier  # the hashes this model has checked
        self.stats: RunStats | None = None
        self.generation_stats: GenerationStats | None = None
        self.decoder = decoder_signature(manifest)
        self.trace = trace or Trace(enabled=False)  # load(trace=True): spans for `take_trace`
        self._engine = make_engine(manifest, plan, verifier, self.trace)
        self._replan = replan  # budget for the blocks -> plan (to make room for a KV cache)
        self._blocks_budget = plan.budget_bytes
        self._smallest = smallest  # the budget is "min"
        self._lock = threading.Lock()
        self._closed = False
        self._batch_plans: dict[tuple, Plan] = {}  # (budget, BatchShape) -> plan

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass. `inputs`: name -> numpy array, as `manifest.inputs` describes; any
        batch. Returns name -> numpy array for every model output; `self.stats` describes the
        pass. Under a budget, a batch other than the plan's is planned for first: its
        activations counted, each block run over the whole batch in micro-batches that fit
        (batch.py), or refused with the budget it needs."""
        return self.run_feeds(check_inputs(self.manifest, inputs))

    def run_feeds(
        self, feeds: dict[str, np.ndarray], shape: BatchShape | None = None
    ) -> dict[str, np.ndarray]:
        """`run` on feeds already checked; `shape`: the batch's, where the feeds do not tell it
        (a stage's tensors between blocks, which no manifest describes: stage.py)."""
        with self._lock:
            if self._closed:
                raise HermesError(f"model '{self.model_dir}' is closed")
            self._plan_batch(shape or batch_shape(self.manifest, feeds))
            outputs, self.stats = self._engine.run(feeds)
        return outputs

    def plan_batch(self, rows: int, positions: int | None = None) -> Plan:
        """The plan a batch of `rows` x `positions` (default: the sample's) runs with, made now
        (as `run` does on such a batch); BudgetError if the budget cannot hold it. Without a
        budget, or for a decoder (whose batch `generate` plans), the plan stays as it is."""
        for name, value in (("rows", rows), ("positions", positions)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise OptionError(f"{name} must be a whole number of at least 1, got {value!r}")
        shape = BatchShape(rows, positions or sample_shape(self.manifest).positions)
        with self._lock:
            self._plan_batch(shape)
        return self.plan

    def _plan_batch(self, shape: BatchShape) -> None:
        """Re-plan under the same budget for a batch of `shape`, when it is not the plan's."""
        if self._replan is None or self.plan.budget_bytes is None or self.plan.engine == "whole":
            return
        planned = BatchShape(
            self.plan.batch_rows or sample_shape(self.manifest).rows,
            self.plan.batch_positions or sample_shape(self.manifest).positions,
        )
        if shape == planned or self.decoder is not None:  # decoders: _reserve_cache
            return
        budget = None if self._smallest else self.plan.budget_bytes
        key = (budget, shape)
        if key not in self._batch_plans:
            self._batch_plans[key] = self._replan(budget, shape)
        self._switch(self._batch_plans[key])

    def _switch(self, plan: Plan) -> None:
        """Run with `plan`: a new engine where its blocks' mechanism differs (resident sessions
        of the old plan go), else the same engine with the new plan (its micro-batch)."""
        if _mechanism(plan) != _mechanism(self.plan):
            self._engine.close()
            self._engine = make_engine(self.manifest, plan, self.verifier, self.trace)
        else:
            self._engine.plan = plan
        self.plan = plan

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
        """Generate up to `max_new_tokens` after the prompt `input_ids` (a list, [T] or [1, T]),
        or after each of a batch of prompts ([B, T], or a list of lists of different lengths,
        left-padded with the attention mask): every pass streams each block once for the whole
        batch. Returns the prompt and the new ids in the prompt's form ([T + N] or [1, T + N]);
        for a batch, [B, T + N] (rows that stopped early padded with the first EOS id) or, for a
        list of lists, a list of arrays (each prompt and its new ids). Greedy unless do_sample.
        eos_token_id: stop ids (default: the model's generation_config.json; [] for none); a row
        stops at its own. streamer(token_id) is called as each token is chosen (a batch: a list,
        None for stopped rows). `generation_stats` describes the call. Under a memory budget,
        the KV cache of the whole batch (prompt plus max_new_tokens) is reserved first and the
        blocks are planned in what is left, for the batch's activations."""
        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        request = generation_request(
            self.model_dir, self.decoder, input_ids, max_new_tokens, sampling, eos_token_id
        )
        prompts = request.prompts
        with self._lock:
            if self._closed:
                raise HermesError(f"model '{self.model_dir}' is closed")
            batch = BatchShape(prompts.rows, prompts.ids.shape[1]) if prompts.rows > 1 else None
            self._reserve_cache(self.decoder.cache_bytes(request.total, prompts.rows), batch)

            def run(feeds):
                outputs, self.stats = self._engine.run(check_inputs(self.manifest, feeds))
                return outputs, self.stats

            new, self.generation_stats = generate_tokens(
                run,
                self.decoder,
                prompts,
                max_new_tokens,
                sampling,
                request.eos,
                streamer,
                request.pad,
            )
        return as_given(input_ids, request, new)

    def _reserve_cache(self, cache_bytes: int, batch: BatchShape | None = None) -> None:
        """Re-plan the blocks in the budget minus the KV cache (for a batch's activations, if
        given), when that changes the plan. The plan keeps the user's budget: its predicted peak
        is the blocks' (cache excluded)."""
        budget = self.plan.budget_bytes
        if self._replan is None or budget is None or self.plan.engine == "whole":
            return
        if (
            self._smallest
        ):  # "min": the smallest budget of the blocks (for the batch), plus this cache
            smallest = self._replan(None, batch).budget_bytes if batch else self.cost.min_budget()
            budget = smallest + cache_bytes
        blocks_budget = budget - cache_bytes
        planned = (self.plan.batch_rows, self.plan.batch_positions)
        wanted = (batch.rows, batch.positions) if batch else (None, None)
        same = self._blocks_budget == blocks_budget and self.plan.budget_bytes == budget
        if same and planned == wanted:
            return
        try:
            plan = replace(self._replan(blocks_budget, batch), budget_bytes=budget)
        except BudgetError as e:
            raise BudgetError(
                f"memory budget {format_bytes(budget)} minus the KV cache of this generation "
                f"({format_bytes(cache_bytes)}) is too small for the blocks: {e}"
            ) from None
        self._switch(plan)
        self._blocks_budget = blocks_budget

    def reserve_cache(self, cache_bytes: int, batch: BatchShape | None = None) -> None:
        """Plan the blocks in the budget minus `cache_bytes` of KV cache kept elsewhere (a
        stage's caches of the generations in flight: stage.py), for `batch`."""
        with self._lock:
            self._reserve_cache(cache_bytes, batch)

    def take_trace(self) -> dict:
        """Chrome trace-event JSON (Perfetto, chrome://tracing) of everything since `load()` or
        the last call: load()'s checks and plan, each block's read-ahead, session creation, wait,
        run and free, one row per thread. Empty unless loaded with `trace=True`."""
        return chrome_trace(self.trace.take())

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


def make_engine(
    manifest: Manifest, plan: Plan, verifier: Verifier, trace: Trace
) -> BlockEngine | WholeEngine:
    """The engine the plan names."""
    if plan.engine == "whole":
        return WholeEngine(manifest, plan, verifier, trace)
    return BlockEngine(manifest, plan, verifier, trace)


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
    page_cache: str = "auto",
    trace: bool = False,
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
    page_cache: under a budget, whether streamed blocks' file pages are dropped after their run
        (later passes read them from storage again) or left to the kernel: "auto" (default) drops
        them only where the process's memory cgroup or the available memory has no room for the
        model's files beside the budget (pagecache.py; the plan says which and why); "keep",
        "drop" force it.
    trace: record a timeline of every load, run and free (`model.take_trace()`: Chrome
        trace-event JSON; `hermes-ort run --trace FILE`).
    """
    t_open = time.perf_counter()
    spec = get_strategy(strategy)  # every option is checked before any file is read
    block_loading(load_path)
    check_objective(objective)
    check_verify_mode(verify)
    check_policy(page_cache)
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
    planner = ModelPlanner(
        model_dir,
        manifest,
        strategy,
        stored,
        PlanOptions(load_path, loaders, window, objective, page_cache),
    )
    if smallest:  # the least memory that works, as the cost model predicts it
        budget = planner.min_budget()
    plan = planner.plan(budget)
    cost = planner.cost_under(budget)
    timeline = Trace(enabled=trace)
    timeline.add("", "open", t_open)
    return HermesModel(
        manifest, plan, cost, verifier, replan=planner.plan, smallest=smallest, trace=timeline
    )


def _mechanism(plan: Plan) -> Plan:
    """What a plan's engine is built from: its blocks, loaders, window, lag and whole-model file,
    without the budget, predictions, reasons and batch bookkeeping it runs with (and without the
    loaders, window and lag where every block stays resident: nothing is streamed)."""
    everything = bool(plan.blocks) and all(b.resident for b in plan.blocks)
    return replace(
        plan,
        loaders=0 if everything else plan.loaders,
        window=0 if everything else plan.window,
        lag=0 if everything else plan.lag,
        budget_bytes=None,
        predicted_peak_bytes=None,
        predicted_latency_s=None,
        predicted_first_latency_s=None,
        reasons=(),
        batch_rows=None,
        batch_positions=None,
        micro_batch=None,
    )
