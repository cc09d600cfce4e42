"""Text generation on a decoder exported with its KV cache: the prompt's passes (prefill: one, or
one per chunk of positions, tensors/prefill.py), then one token per pass, each block reading and
returning its own layer's cache.

The cache lives in this loop (numpy arrays, [B, kv_heads, tokens, head_dim] per layer and
key/value) between passes; the engine streams or keeps resident the blocks as its plan says. A
batch of prompts is left-padded with its attention mask and position ids as transformers pads it,
so each row's greedy tokens are those of its prompt alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hermes_ort.core.errors import InputError
from hermes_ort.tensors.kv_cache import DecoderSignature
from hermes_ort.tensors.prefill import check_prefill_chunk, prefill_spans


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (argmax) unless do_sample; then temperature, top-k and
    top-p (nucleus) filter the distribution in that order, as transformers' warpers do."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def check(self) -> None:
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float  # the prompt pass and the first token's choice
    total_s: float
    decode_tokens_per_s: float  # tokens after the first, per second of their passes
    peak_rss_bytes: int  # the highest of the passes' peaks
    bytes_read: int  # from storage, all passes
    cache_bytes: int  # the KV cache at the end
    stopped_by: str  # "eos" (every row) | "max_new_tokens"
    batch_size: int = 1  # prompts generated at once (new_tokens: over all of them)
    prefill_passes: int = 1  # passes the prompt took (a chunked prefill: one per chunk)


def decode_rate(new_tokens: int, rows: int, first_s: float, total_s: float) -> float:
    """Tokens after each row's first, per second after the first token (0 if none)."""
    decode_s = total_s - first_s
    return (new_tokens - rows) / decode_s if new_tokens > rows and decode_s > 0 else 0.0


def combined_stats(parts: Sequence[GenerationStats], total_s: float) -> GenerationStats:
    """One call's stats from those of its groups of rows generated at once over `total_s`: the
    first token when the slowest group had its, stopped by "eos" if every group was."""
    count = sum(p.new_tokens for p in parts)
    rows = sum(p.batch_size for p in parts)
    first = max(p.time_to_first_token_s for p in parts)
    return GenerationStats(
        prompt_tokens=sum(p.prompt_tokens for p in parts),
        new_tokens=count,
        time_to_first_token_s=first,
        total_s=total_s,
        decode_tokens_per_s=decode_rate(count, rows, first, total_s),
        peak_rss_bytes=max(p.peak_rss_bytes for p in parts),
        bytes_read=sum(p.bytes_read for p in parts),
        cache_bytes=sum(p.cache_bytes for p in parts),
        stopped_by="eos" if all(p.stopped_by == "eos" for p in parts) else "max_new_tokens",
        batch_size=rows,
        prefill_passes=max(p.prefill_passes for p in parts),
    )


@dataclass(frozen=True)
class Prompts:
    """Prompts as one left-padded batch: ids [B, T] int64, the attention mask [B, T] (0 over the
    padding), and the form they came in (`single`: a list or [T] / [1, T] array; `ragged`: a list
    of lists of different lengths)."""

    ids: np.ndarray
    mask: np.ndarray
    single: bool
    ragged: bool

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    @property
    def lengths(self) -> list[int]:
        return [int(n) for n in self.mask.sum(axis=1)]


def prompt_batch(input_ids: Any, pad_id: int = 0) -> Prompts:
    """One prompt (a list of ids, [T] or [1, T]), a batch ([B, T]) or prompts of different
    lengths (a list of lists: left-padded with `pad_id`, the mask 0 there)."""
    ragged = isinstance(input_ids, (list, tuple)) and any(
        isinstance(x, (list, tuple, np.ndarray)) for x in input_ids
    )
    if ragged:
        rows = [np.asarray(r) for r in input_ids]
        for i, r in enumerate(rows):
            if r.ndim != 1 or r.size == 0:
                raise InputError(f"prompt {i} must be a non-empty list of ids, got shape {r.shape}")
            if not np.issubdtype(r.dtype, np.integer):
                raise InputError(f"prompt {i} must hold integer token ids, got dtype {r.dtype}")
        width = max(r.size for r in rows)
        ids = np.full((len(rows), width), pad_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, width - r.size :] = r
            mask[i, width - r.size :] = 1
        return Prompts(ids, mask, single=False, ragged=len({r.size for r in rows}) > 1)
    ids = np.asarray(input_ids)
    single = ids.ndim == 1 or (ids.ndim == 2 and ids.shape[0] == 1)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise InputError(
            f"input_ids must be a list, [T] or [B, T] array, or a list of prompts; got shape "
            f"{ids.shape}"
        )
    if ids.shape[1] == 0:
        raise InputError("input_ids is empty: give at least one prompt token")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    return Prompts(ids, np.ones_like(ids), single=single, ragged=False)


@dataclass(frozen=True)
class Request:
    """A checked generate call: the prompts batched, the stop ids, the padding id, the positions
    it will reach, and how to sample."""

    prompts: Prompts
    eos: tuple[int, ...]
    pad: int
    total: int  # prompt width + max_new_tokens
    sampling: Sampling


def generation_request(
    model_dir: Path,
    sig: DecoderSignature | None,
    input_ids: Any,
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: int | Sequence[int] | None,
) -> Request:
    """A generate call's arguments checked against the decoder (InputError naming what is
    wrong): eos_token_id None = the model's generation_config.json, [] = none."""
    if sig is None:
        raise InputError(
            f"model '{model_dir}' has no KV cache inputs (past_key_values.*): export a decoder "
            f"with its cache (the default; not --no-kv-cache) to generate"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if eos_token_id is None:
        eos = default_eos(model_dir)
    else:
        eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    pad = eos[0] if eos else 0
    prompts = prompt_batch(input_ids, pad)
    if prompts.ragged and not sig.takes_position_ids:
        raise InputError(
            f"model '{model_dir}' takes no position_ids (its graph computes positions from the "
            f"attention mask, for unpadded rows): give prompts of equal length"
        )
    width = prompts.ids.shape[1]
    total = width + max_new_tokens
    if sig.max_positions and total > sig.max_positions:
        raise InputError(
            f"prompt of {width} tokens + max_new_tokens {max_new_tokens} = {total} positions, "
            f"more than the model supports ({sig.max_positions})"
        )
    sampling.check()
    return Request(prompts, eos, pad, total, sampling)


def as_given(input_ids: Any, request: Request, new: list[list[int]]) -> Any:
    """The prompts and their new ids in the form the prompts came in: [T + N] or [1, T + N] for
    one, [B, T + N] for a batch (rows that stopped early padded), a list of arrays for a list."""
    prompts, pad = request.prompts, request.pad
    width = prompts.ids.shape[1]
    if prompts.single:
        out = np.concatenate([prompts.ids, np.array(new, np.int64)], axis=1)
        return out if np.ndim(input_ids) == 2 else out[0]
    if isinstance(input_ids, (list, tuple)):  # a list of prompts: a list of rows
        return [
            np.concatenate([prompts.ids[r, width - n :], np.array(new[r], np.int64)])
            for r, n in enumerate(prompts.lengths)
        ]
    longest = max(len(n) for n in new)
    tail = np.full((prompts.rows, longest), pad, np.int64)
    for r, n in enumerate(new):
        tail[r, : len(n)] = n
    return np.concatenate([prompts.ids, tail], axis=1)


def default_eos(model_dir: Path) -> tuple[int, ...]:
    """The end-of-sequence ids of the exported generation_config.json (else config.json), as
    transformers' generate uses them by default."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (int(eos),)
    return ()


def choose_next(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from the last position's logits [vocab]."""
    if not sampling.do_sample:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scores.size:
        kth = np.partition(scores, -sampling.top_k)[-sampling.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if sampling.top_p is not None and sampling.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = cumulative - probs[order] < sampling.top_p  # the smallest set reaching top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def step_feeds(
    sig: DecoderSignature,
    ids: np.ndarray,
    mask: np.ndarray,
    positions: np.ndarray,
    cache: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Inputs of one pass: `ids` [B, n] new tokens, `mask` [B, past + n] over every position so
    far (0 over left padding), `positions` [B, n] their position ids."""
    feeds = {"input_ids": ids, "attention_mask": mask, **cache}
    if sig.takes_position_ids:
        feeds["position_ids"] = positions
    return feeds


def prompt_positions(mask: np.ndarray) -> np.ndarray:
    """Position ids of left-padded prompts, as transformers makes them: each row counts from 0 at
    its first real token; padding gets 1 (masked out anyway)."""
    positions = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


def generate_tokens(
    run: Callable[[dict[str, np.ndarray]], tuple[dict[str, np.ndarray], Any]],
    sig: DecoderSignature,
    prompts: Prompts,
    max_new_tokens: int,
    sampling: Sampling,
    eos: Sequence[int],
    streamer: Callable[[Any], Any] | None = None,
    pad_id: int = 0,
    runner_keeps_cache: bool = False,
    prefill_chunk: int | None = None,
) -> tuple[list[list[int]], GenerationStats]:
    """The loop, over a batch: each pass runs every row's next token at once (`run(feeds)` ->
    (outputs, RunStats) is one pass of the model, which streams each block once for the whole
    batch; its logits may be every position's or the last one's). A row that meets an
    end-of-sequence id stops there (later passes feed it `pad_id`, its tokens discarded); the loop
    stops when every row has. streamer(token) for one prompt, streamer(list of B tokens, None
    where a row has stopped) for a batch. `runner_keeps_cache`: `run` keeps the KV cache itself
    (each board its own layers': the cluster), so the feeds carry no past and the outputs no
    present. `prefill_chunk`: the prompt run this many positions per pass, the cache carried
    from chunk to chunk (None: one pass); the last chunk's last position chooses the first
    token, and the time to it covers every chunk."""
    chunk = check_prefill_chunk(prefill_chunk)
    rng = np.random.default_rng(sampling.seed)
    rows = prompts.rows
    cache = {} if runner_keeps_cache else sig.empty_cache(rows)
    peak, read = 0, 0

    def one_pass(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run `ids` [B, n] after the cache; their last position's logits [B, vocab]."""
        nonlocal cache, peak, read
        outputs, stats = run(step_feeds(sig, ids, mask, positions, cache))
        if not runner_keeps_cache:
            cache = {s.past: outputs[s.present] for s in sig.slots}
        peak, read = max(peak, stats.peak_rss_bytes), read + stats.bytes_read
        return np.array(outputs[sig.logits][:, -1])  # a copy: not a view of every position's

    mask = prompts.mask
    positions = prompt_positions(mask)
    spans = prefill_spans(mask.shape[1], chunk)
    new: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    t0 = time.perf_counter()
    first_s, stopped_by = 0.0, "max_new_tokens"
    step_ids = prompts.ids
    for step in range(max_new_tokens):
        if step == 0:  # the prompt, chunk by chunk: each mask covers every position so far
            for start, end in spans:
                logits = one_pass(step_ids[:, start:end], mask[:, :end], positions[:, start:end])
        else:
            logits = one_pass(step_ids, mask, positions)
        chosen: list[int | None] = []
        for r in range(rows):
            if done[r]:
                chosen.append(None)
                continue
            token = choose_next(logits[r], sampling, rng)
            new[r].append(token)
            chosen.append(token)
            done[r] = token in eos
        if step == 0:
            first_s = time.perf_counter() - t0
        if streamer is not None:
            streamer(chosen[0] if prompts.single else chosen)
        if all(done):
            stopped_by = "eos"
            break
        step_ids = np.array([[pad_id if t is None else t] for t in chosen], np.int64)
        mask = np.concatenate([mask, np.ones((rows, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    total = time.perf_counter() - t0
    count = sum(len(n) for n in new)
    stats = GenerationStats(
        prompt_tokens=int(prompts.mask.sum()),
        new_tokens=count,
        time_to_first_token_s=first_s,
        total_s=total,
        decode_tokens_per_s=decode_rate(count, rows, first_s, total),
        peak_rss_bytes=peak,
        bytes_read=read,
        cache_bytes=sig.cache_bytes(mask.shape[1], rows)
        if runner_keeps_cache
        else sum(v.nbytes for v in cache.values()),
        stopped_by=stopped_by,
        batch_size=rows,
        prefill_passes=len(spans),
    )
    return new, stats
