"""The Python API: `hermes_ort.load(model_dir, memory_budget=..., strategy=...)`."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from hermes_ort.core.choices import Engine, Residency
from hermes_ort.core.errors import BudgetError, HermesError, InputError, OptionError
from hermes_ort.core.manifest import Manifest, load_manifest
from hermes_ort.core.stats import RunStats
from hermes_ort.core.trace import Trace, chrome_trace
from hermes_ort.core.units import format_bytes
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
from hermes_ort.planning.plan import Plan
from hermes_ort.planning.strategies import get_strategy, opened_graphs
from hermes_ort.runtime.load_options import LoadOptions
from hermes_ort.runtime.model_planner import ModelPlanner, PlanOptions
from hermes_ort.runtime.tasks import ChatAndEmbed
from hermes_ort.streaming.block_engine import BlockEngine
from hermes_ort.streaming.integrity import Verifier
from hermes_ort.streaming.paged_blocks import PagedBlocks
from hermes_ort.streaming.whole_engine import WholeEngine
from hermes_ort.tensors.batch import BatchShape, batch_shape, sample_shape
from hermes_ort.tensors.inputs import check_inputs, sample_inputs
from hermes_ort.tensors.kv_cache import decoder_signature
from hermes_ort.tensors.prefill import check_prefill_chunk, chunked_prefill_refusal


class HermesModel(ChatAndEmbed):
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
        smallest_for: Callable[..., int] | None = None,
        trace: Trace | None = None,
    ):
        self.model_dir = verifier.model_dir
        self.manifest = manifest
        self.plan = plan
        self.cost = cost
        self.verifier = verifier  # the hashes this model has checked
        self.stats: RunStats | None = None
        self.generation_stats: GenerationStats | None = None
        self.generated_text: str | list[str] | None = None  # generate()'s new text, for text in
        self.decoder = decoder_signature(manifest)
        self.trace = trace or Trace(enabled=False)  # load(trace=True): spans for `take_trace`
        self._engine = make_engine(manifest, plan, verifier, self.trace)
        self._replan = replan  # budget for the blocks -> plan (to make room for a KV cache)
        self._blocks_budget = plan.budget_bytes
        self._smallest = smallest  # the budget is "min"
        self._smallest_for = smallest_for  # (BatchShape, generation) -> the least that runs it
        self._cache_reserved = False  # a KV cache planned for (generate, a cluster stage)
        self._lock = threading.Lock()
        self._closed = False
        self._batch_plans: dict[tuple, Plan] = {}  # (budget, BatchShape) -> plan

    @property
    def smallest(self) -> bool:
        """Loaded with memory_budget="min": each shape runs in the least budget that holds it."""
        return self._smallest

    def run(
        self, inputs: dict[str, np.ndarray], *, last_logits: bool = False
    ) -> dict[str, np.ndarray]:
        """One forward pass. `inputs`: name -> numpy array, as `manifest.inputs` describes; any
        batch. Returns name -> numpy array for every model output; `self.stats` describes the
        pass. Under a budget, a batch other than the plan's is planned for first: its
        activations counted, each block run over the whole batch in micro-batches that fit
        (batch.py), or refused with the budget it needs.

        last_logits: a decoder's (a model with a KV cache) `logits` at the last position only,
            [rows, 1, vocab] instead of [rows, positions, vocab]: its head blocks are fed the last
            position alone (tensors/last_position.py), so the prompt pass neither computes nor
            holds the others (the `full` strategies' one session computes them all and returns
            the last). The last column is each row's last token when prompts are left-padded
            or unpadded, as generate pads them. OptionError for a model without a KV cache."""
        if last_logits and self.decoder is None:
            raise OptionError(
                f"last_logits: model '{self.model_dir}' is not a decoder with a KV cache "
                f"(past_key_values.*); its outputs have no last-position logits to keep"
            )
        return self.run_feeds(check_inputs(self.manifest, inputs), last_logits=last_logits)

    def run_feeds(
        self,
        feeds: dict[str, np.ndarray],
        shape: BatchShape | None = None,
        last_logits: bool = False,
    ) -> dict[str, np.ndarray]:
        """`run` on feeds already checked; `shape`: the batch's, where the feeds do not tell it
        (a stage's tensors between blocks, which no manifest describes: cluster/stage_runner.py)."""
        with self._lock:
            if self._closed:
                raise HermesError(f"model '{self.model_dir}' is closed")
            self._plan_batch(shape or batch_shape(self.manifest, feeds))
            outputs, self.stats = self._engine.run(feeds, last_logits=last_logits)
        return outputs

    def plan_batch(self, rows: int, positions: int | None = None, generation: bool = False) -> Plan:
        """The plan a batch of `rows` x `positions` (default: the sample's) runs with, made now
        (as `run` does on such a batch); BudgetError if the budget cannot hold it. Without a
        budget the plan stays as it is. `generation` (a decoder): the plan `generate` makes
        for prompts of that shape (last-position logits, prefill chunks; the KV cache of the
        prompt counted, none for new tokens)."""
        for name, value in (("rows", rows), ("positions", positions)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise OptionError(f"{name} must be a whole number of at least 1, got {value!r}")
        shape = BatchShape(rows, positions or sample_shape(self.manifest).positions)
        with self._lock:
            if generation and self.decoder is not None:
                cache = 2 * self.decoder.cache_bytes(shape.positions, shape.rows)
                self._reserve_cache(cache, shape, generation=True)
            else:
                self._plan_batch(shape)
        return self.plan

    def _plan_batch(self, shape: BatchShape) -> None:
        """Re-plan under the same budget for a batch of `shape`, when it is not the plan's."""
        unbudgeted = self.plan.budget_bytes is None
        if self._replan is None or unbudgeted or self.plan.engine == Engine.WHOLE:
            return
        planned = BatchShape(
            self.plan.batch.rows or sample_shape(self.manifest).rows,
            self.plan.batch.positions or sample_shape(self.manifest).positions,
        )
        if shape == planned or self._cache_reserved:  # generating: planned by _reserve_cache
            return
        budget = None if self._smallest else self.plan.budget_bytes
        key = (budget, shape)
        if key not in self._batch_plans:
            self._batch_plans[key] = self._replan(budget, shape)
        self._switch(self._batch_plans[key])

    def _switch(self, plan: Plan) -> None:
        """Run with `plan`: a new engine where its blocks' mechanism differs (resident sessions
        of the old plan go), else the same engine with the new plan (its micro-batch)."""
        if plan.mechanism.engine_key() != self.plan.mechanism.engine_key():
            # the paged blocks' sessions stay open for the new engine (their opening is slow)
            paged = self._engine.take_paged() if isinstance(self._engine, BlockEngine) else None
            self._engine.close()
            self._engine = make_engine(self.manifest, plan, self.verifier, self.trace, paged)
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
        *,
        prefill_chunk: int | None = None,
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
        blocks are planned in what is left, for the batch's activations. A prompt may be text
        (a str, or a list of str), encoded with the model directory's tokenizer (TokenizerError
        without one): the ids come back as for the encoded prompts, and the new text, decoded,
        is left in `generated_text` (a str, or a list of str; None after ids).

        The prompt pass computes the last position's logits only (`run(last_logits=True)`).
        prefill_chunk: the prompt run this many positions per pass, each reading the KV cache
        of the ones before (llama.cpp's n_ubatch, vLLM's chunked prefill), so its activations
        and logits stay bounded; None (default) = as the plan says (`plan.batch.prefill_chunk`,
        None there: the whole prompt in one pass); a chunk at least the prompt's length = one
        pass. OptionError for anything but a whole number >= 1, or where the graph cannot take
        this batch in chunks (`hermes_ort.tensors.prefill.chunked_prefill_refusal`: the fused
        graph's GroupQueryAttention takes a batch of one only)."""
        check_prefill_chunk(prefill_chunk)
        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        tokenizer = None
        if self.decoder is not None:  # else generation_request names the missing KV cache
            input_ids, tokenizer = _encode_text(self.model_dir, input_ids)
        request = generation_request(
            self.model_dir, self.decoder, input_ids, max_new_tokens, sampling, eos_token_id
        )
        prompts = request.prompts
        with self._lock:
            if self._closed:
                raise HermesError(f"model '{self.model_dir}' is closed")
            batch = BatchShape(prompts.rows, prompts.ids.shape[1])
            # past and present caches live side by side while a pass runs: both counted
            cache = 2 * self.decoder.cache_bytes(request.total, prompts.rows)
            self._reserve_cache(cache, batch, generation=True)
            chunk = self._prefill_chunk(prefill_chunk, prompts.ids.shape)

            def run(feeds):
                checked = check_inputs(self.manifest, feeds)
                outputs, self.stats = self._engine.run(checked, last_logits=True)
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
                prefill_chunk=chunk,
            )
            texts = None if tokenizer is None else [tokenizer.decode(n) for n in new]
            self.generated_text = texts[0] if texts and prompts.single else texts
        return as_given(input_ids, request, new)

    def _prefill_chunk(self, given: int | None, prompt: tuple[int, int]) -> int | None:
        """The chunk a [rows, width] prompt is prefilled in: `given`, else the plan's (read after
        `_reserve_cache`, which may re-plan); OptionError where the graph cannot take it."""
        chunk = given if given is not None else self.plan.batch.prefill_chunk
        rows, width = prompt
        if chunk is None or chunk >= width:
            return None
        if chunk > 1:  # one position after a past is the decode step: every graph takes it
            why = chunked_prefill_refusal(self.model_dir, self.manifest, rows)
            if why:
                whose = "" if given is not None else " (the plan's)"
                raise OptionError(f"prefill_chunk {chunk}{whose}: {why}")
        return chunk

    def _reserve_cache(
        self, cache_bytes: int, batch: BatchShape | None = None, generation: bool = False
    ) -> None:
        """Re-plan the blocks in the budget minus the KV cache (for a batch's activations, if
        given; `generation`: a prompt pass, logits of its last position, chunks allowed), when
        that changes the plan. The plan keeps the user's budget: its predicted peak is the
        blocks' (cache excluded)."""
        self._cache_reserved = True
        budget = self.plan.budget_bytes
        if self._replan is None or budget is None or self.plan.engine == Engine.WHOLE:
            return
        if (
            self._smallest
        ):  # "min": the smallest budget of the blocks (for the batch), plus this cache
            budget = self._blocks_smallest(batch, generation) + cache_bytes
        blocks_budget = budget - cache_bytes
        planned = (self.plan.batch.rows, self.plan.batch.positions)
        wanted = (batch.rows, batch.positions) if batch else (None, None)
        same = self._blocks_budget == blocks_budget and self.plan.budget_bytes == budget
        if same and planned == wanted:
            return
        try:
            plan = (
                self._replan(blocks_budget, batch, generation)
                if batch
                else self._replan(blocks_budget)
            )
            plan = replace(plan, budget_bytes=budget)
        except BudgetError as e:
            raise BudgetError(
                f"memory budget {format_bytes(budget)} minus the KV cache of this generation "
                f"({format_bytes(cache_bytes)}) is too small for the blocks: {e}"
            ) from None
        self._switch(plan)
        self._blocks_budget = blocks_budget

    def smallest_budget(self, batch: BatchShape | None = None, generation: bool = False) -> int:
        """The smallest budget that runs `batch` (None: the plan's batch, else the sample), by
        the cost model: one row of the smallest prefill chunk at a time; `generation`: a
        decoder's prompts of that shape, their KV cache included (past and present)."""
        if batch is None and self.plan.batch.rows is not None:
            batch = BatchShape(self.plan.batch.rows, self.plan.batch.positions)
        cache = 0
        if batch is not None and generation and self.decoder is not None:
            cache = 2 * self.decoder.cache_bytes(batch.positions, batch.rows)
        return self._blocks_smallest(batch, generation) + cache

    def _blocks_smallest(self, batch: BatchShape | None, generation: bool) -> int:
        """The blocks' smallest budget for `batch` (None: the sample's), no KV cache."""
        if batch is None or self._smallest_for is None:
            return self.cost.min_budget()
        return self._smallest_for(batch, generation)

    def reserve_cache(
        self, cache_bytes: int, batch: BatchShape | None = None, generation: bool = False
    ) -> None:
        """Plan the blocks in the budget minus `cache_bytes` of KV cache kept elsewhere (a
        stage's caches of the generations in flight: cluster/stage_runner.py; the server's
        pool: serve/served_model.py), for `batch` (`generation`: prompts of that shape, in
        chunks if the plan needs them, `plan.batch.prefill_chunk`). Passes then run with
        that plan, whatever their shape, until the next reservation."""
        with self._lock:
            self._reserve_cache(cache_bytes, batch, generation)

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


def _encode_text(model_dir: Path, prompt: Any) -> tuple[Any, Any]:
    """(token ids, tokenizer) for a text prompt or a list of them; ids are passed through."""
    one = isinstance(prompt, str)
    many = isinstance(prompt, (list, tuple)) and any(isinstance(p, str) for p in prompt)
    if not (one or many):
        return prompt, None
    if many and not all(isinstance(p, str) for p in prompt):
        raise InputError("give prompts all as text or all as token ids, not a mix")
    from hermes_ort.generation.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)  # TokenizerError naming what is missing
    ids = tokenizer.encode(prompt) if one else [tokenizer.encode(p) for p in prompt]
    return ids, tokenizer


class BudgetNotHonoured(UserWarning):
    """A baseline strategy was given a memory budget that its fixed plan may exceed."""


def budget_note(spec, plan: Plan, budget: int | None) -> str | None:
    """Why a baseline given a budget may exceed it; None for pipeload (planned within it), no
    budget, or a per-block baseline whose fixed plan is predicted to fit (ondemand's window of one
    block: the smallest workable budget). Budgets below that are refused for both per-block
    baselines; the whole-model ones check none."""
    if budget is None or spec.residency is Residency.PLANNED:
        return None
    if spec.engine is Engine.WHOLE:
        why = "it opens the whole model in one session"
    else:
        peak = plan.prediction.peak_bytes
        if peak is None or peak <= budget:
            return None
        fixed = (
            "every block kept resident"
            if spec.residency is Residency.ALL
            else f"a fixed window of {plan.window} block(s)"
        )
        why = f"{fixed}: predicted peak {format_bytes(peak)}"
    return (
        f"strategy '{spec.name}' does not honour the memory budget of {format_bytes(budget)} "
        f"({why}); only pipeload plans within a budget"
    )


def make_engine(
    manifest: Manifest,
    plan: Plan,
    verifier: Verifier,
    trace: Trace,
    paged: PagedBlocks | None = None,
) -> BlockEngine | WholeEngine:
    """The engine the plan names; `paged`: paged blocks a previous engine opened."""
    if plan.engine == Engine.WHOLE:
        if paged is not None:
            paged.close()
        return WholeEngine(manifest, plan, verifier, trace)
    return BlockEngine(manifest, plan, verifier, trace, paged)


def open_model(model_dir: str | Path, options: LoadOptions) -> HermesModel:
    """A model directory opened on this board with options already checked
    (`hermes_ort.load` is the public entry, documenting each option)."""
    t_open = time.perf_counter()
    o = options
    spec = get_strategy(o.strategy)
    budget = o.budget_bytes
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    verifier = Verifier(model_dir, o.verify)
    verifier.check_graphs(opened_graphs(manifest, spec))
    stored = None
    if o.profile is not False:
        stored = ensure_profile(model_dir) if o.profile else read_profile(model_dir)
    planner = ModelPlanner(
        model_dir,
        manifest,
        o.strategy,
        stored,
        PlanOptions(o.load_path, o.loaders, o.window, o.objective, o.page_cache, o.paging),
    )
    if o.smallest:  # the least memory that works, as the cost model predicts it
        budget = planner.min_budget()
    try:
        plan = planner.plan(budget)
    except BudgetError:
        if not planner.decoder:
            raise
        # a decoder's sample (every position's logits at once) is not what it will run: plan a
        # short prompt; generate (and run) re-plan for their own shapes, or refuse them then
        plan = planner.plan(budget, BatchShape(1, 1), generation=True)
    note = budget_note(spec, plan, budget)
    if note:  # stacklevel: the caller of hermes_ort.load
        warnings.warn(note, BudgetNotHonoured, stacklevel=3)
    cost = planner.cost_under(budget)
    trace = Trace(enabled=o.trace)
    trace.add("", "open", t_open)
    return HermesModel(
        manifest,
        plan,
        cost,
        verifier,
        replan=planner.plan,
        smallest=o.smallest,
        smallest_for=planner.smallest_for,
        trace=trace,
    )
