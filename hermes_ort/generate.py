"""Text generation on a decoder exported with its KV cache: one prompt pass (prefill), then one
token per pass, each block reading and returning its own layer's cache.

The cache lives in this loop (numpy arrays, [1, kv_heads, tokens, head_dim] per layer and
key/value),
between passes; the engine streams or keeps resident the blocks as its plan says.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hermes_ort.decoder import DecoderSignature
from hermes_ort.errors import InputError


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
    stopped_by: str  # "eos" | "max_new_tokens"


def prompt_ids(input_ids: Any) -> np.ndarray:
    """A prompt as int64 [1, T]: a list of ids, a 1-D array or a [1, T] array."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise InputError(
            f"input_ids must be one prompt: a list, [T] or [1, T] array, got shape {ids.shape}"
        )
    if ids.shape[1] == 0:
        raise InputError("input_ids is empty: give at least one prompt token")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    return ids.astype(np.int64)


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
    sig: DecoderSignature, ids: np.ndarray, past_len: int, cache: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Inputs of one pass: `ids` [1, n] new tokens after `past_len` cached ones."""
    n = ids.shape[1]
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, past_len + n), np.int64), **cache}
    if sig.takes_position_ids:
        feeds["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None]
    return feeds


def generate_tokens(
    run: Callable[[dict[str, np.ndarray]], tuple[dict[str, np.ndarray], Any]],
    sig: DecoderSignature,
    ids: np.ndarray,
    max_new_tokens: int,
    sampling: Sampling,
    eos: Sequence[int],
    streamer: Callable[[int], Any] | None = None,
) -> tuple[list[int], GenerationStats]:
    """The loop. `run(feeds)` -> (outputs, RunStats) is one pass of the model."""
    rng = np.random.default_rng(sampling.seed)
    cache = sig.empty_cache()
    past_len, new, peak, read = 0, [], 0, 0
    t0 = time.perf_counter()
    first_s, stopped_by = 0.0, "max_new_tokens"
    step_ids = ids
    for _ in range(max_new_tokens):
        outputs, stats = run(step_feeds(sig, step_ids, past_len, cache))
        past_len += step_ids.shape[1]
        cache = {s.past: outputs[s.present] for s in sig.slots}
        peak, read = max(peak, stats.peak_rss_bytes), read + stats.bytes_read
        token = choose_next(outputs[sig.logits][0, -1], sampling, rng)
        new.append(token)
        if len(new) == 1:
            first_s = time.perf_counter() - t0
        if streamer is not None:
            streamer(token)
        if token in eos:
            stopped_by = "eos"
            break
        step_ids = np.array([[token]], np.int64)
    total = time.perf_counter() - t0
    decode_s = total - first_s
    stats = GenerationStats(
        prompt_tokens=ids.shape[1],
        new_tokens=len(new),
        time_to_first_token_s=first_s,
        total_s=total,
        decode_tokens_per_s=(len(new) - 1) / decode_s if len(new) > 1 and decode_s > 0 else 0.0,
        peak_rss_bytes=peak,
        bytes_read=read,
        cache_bytes=sum(v.nbytes for v in cache.values()),
        stopped_by=stopped_by,
    )
    return new, stats
