"""The model a server serves, opened once: a decoder with its text, its KV cache pool and the
decoding thread (scheduler.py), or an encoder for embeddings.

Under a budget the pool is planned first: the blocks get the smallest budget that runs a prompt
of the whole context (in prefill chunks if need be) and the pool the rest, up to what
`max_batch` requests of the whole context could use (`--kv-cache` sets it instead); the blocks
are then planned in the budget minus the pool. Decode steps of up to max_batch rows need no
more activations than a prefill chunk of as many positions, which the plan holds.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hermes_ort.api.loading import load
from hermes_ort.core.errors import BudgetError, OptionError
from hermes_ort.core.units import format_bytes
from hermes_ort.generation.tokenizer import TextTokenizer, load_tokenizer
from hermes_ort.runtime.model import HermesModel
from hermes_ort.serve.scheduler import Scheduler, SchedulerOptions
from hermes_ort.serve.serve_options import ServeOptions
from hermes_ort.serve.text_stream import TextModel
from hermes_ort.tensors.batch import BatchShape
from hermes_ort.tensors.batch_cache import BatchCache, cache_layout
from hermes_ort.tensors.kv_cache import DecoderSignature
from hermes_ort.tensors.prefill import uses_group_query_attention

DEFAULT_CONTEXT = 2048  # positions per request when --ctx is not given (at most the model's)
MIN_POOL_POSITIONS = 64  # a pool with room for fewer positions per request is refused


@dataclass
class ServedModel:
    name: str
    model: HermesModel
    text: TextModel | None  # None: an encoder (embeddings only)
    scheduler: Scheduler | None
    context: int
    created: int  # when it was opened (unix seconds), for /v1/models
    tokenizer: TextTokenizer | None = None  # an encoder's, loaded once (embeddings' usage)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        self.model.close()


def open_served(options: ServeOptions, log=print) -> ServedModel:
    """Load the model as `options` say and start its decoding thread (a decoder)."""
    o = options
    model = load(o.model_dir, memory_budget=o.budget, strategy=o.strategy, paging=o.paging)
    name = o.name or model.manifest.name or Path(o.model_dir).name
    sig = model.decoder
    if sig is None:
        try:
            tokenizer = load_tokenizer(model.model_dir)  # embed needs it too: named at start
        except BaseException:
            model.close()
            raise
        log(f"serving '{name}': an encoder, for /v1/embeddings")
        return ServedModel(name, model, None, None, 0, int(time.time()), tokenizer)
    try:
        context = serving_context(sig, o.ctx)
        text = TextModel.of(model.model_dir, context)
        gqa = uses_group_query_attention(model.model_dir, model.manifest)
        mixes = gqa or sig.takes_position_ids  # rows of different lengths in one pass
        max_batch = o.max_batch if mixes else 1
        if not mixes and o.max_batch > 1:
            log(
                f"note: '{name}' takes no position_ids, so rows of different lengths cannot "
                f"share a pass: requests decode one at a time (--max-batch 1)"
            )
        pool = kv_pool(model, sig, o, context, max_batch)
        cache = BatchCache(sig, cache_layout(gqa), min_rows=2 if mixes else 1)
        scheduler = Scheduler(
            lambda feeds: _one_pass(model, feeds),
            cache,
            SchedulerOptions(max_batch, o.max_queue, pool, model.plan.batch.prefill_chunk),
            on_error=lambda e: print(f"hermes-ort serve: a pass failed: {e}", file=sys.stderr),
        )
    except BaseException:
        model.close()
        raise
    budget = model.plan.budget_bytes
    split = (
        "no budget (KV cache not limited)"
        if budget is None
        else f"budget {format_bytes(budget)}: KV cache pool {format_bytes(pool)}, blocks the rest"
    )
    log(
        f"serving '{name}': up to {max_batch} requests at once, {context} positions each; "
        f"{split}; {model.plan.describe().splitlines()[0]}"
    )
    return ServedModel(name, model, text, scheduler, context, int(time.time()))


def _one_pass(model: HermesModel, feeds):
    outputs = model.run(feeds, last_logits=True)
    return outputs, model.stats.bytes_read if model.stats else 0


def serving_context(sig: DecoderSignature, asked: int | None) -> int:
    """Positions a request may reach: --ctx, at most the model's; default DEFAULT_CONTEXT."""
    most = sig.max_positions
    if asked is None:
        return min(most or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
    if most and asked > most:
        raise OptionError(f"--ctx {asked} is more than the model's {most} positions")
    return asked


def kv_pool(
    model: HermesModel,
    sig: DecoderSignature,
    options: ServeOptions,
    context: int,
    max_batch: int,
) -> int | None:
    """The KV cache pool in bytes (None: no budget and none asked), the blocks re-planned in
    the rest; BudgetError when the budget cannot hold the blocks and a useful pool."""
    budget = model.plan.budget_bytes
    asked = options.kv_cache_bytes
    if budget is None:
        return asked
    prompt = BatchShape(1, context)
    worst = 2 * sig.cache_bytes(context, max(max_batch, 2))
    if model.smallest:  # the blocks at their smallest, the pool added
        pool = asked if asked is not None else worst
    else:
        blocks = model.smallest_budget(prompt, generation=True) - 2 * sig.cache_bytes(context)
        spare = budget - blocks
        pool = min(worst, spare) if asked is None else asked
        if pool > spare:
            raise BudgetError(
                f"--kv-cache {format_bytes(pool)} leaves the blocks {format_bytes(budget - pool)} "
                f"of the budget {format_bytes(budget)}, less than the {format_bytes(blocks)} "
                f"they need for a prompt of {context} positions"
            )
    floor = 2 * sig.cache_bytes(MIN_POOL_POSITIONS, 2)
    if pool < floor:
        raise BudgetError(
            f"the budget {format_bytes(budget)} leaves {format_bytes(max(pool, 0))} for the "
            f"KV cache, less than {format_bytes(floor)} ({MIN_POOL_POSITIONS} positions of one "
            f"request): give a larger --budget, or a smaller --ctx"
        )
    model.reserve_cache(pool, prompt, generation=True)
    return pool
