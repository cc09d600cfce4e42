"""Chunked prefill: a decoder's prompt run `chunk` positions per pass (llama.cpp's n_ubatch, vLLM's
chunked prefill), each pass reading the KV cache of the ones before, so the activations and the
per-pass logits stay bounded by the chunk rather than the prompt.

Pass k runs positions [k*c, (k+1)*c) with the presents of passes 0..k-1 as its past and the
attention mask over [0, (k+1)*c). optimum's graphs (gpt2, llama, qwen2, ... with position_ids and
a causal mask over past + new) give the same logits and cache as one pass, left padding included
(a row whose first chunks are all padding attends to nothing real there, as the padding of a
whole-prompt pass does). The fused graph's GroupQueryAttention (ONNX Runtime's CPU kernel,
1.32) takes several new positions after a past only for a batch of one: it refuses a batch
("batch_size must be 1 when sequence_length > 1 and past context is given",
group_query_attention_helper.h); for one prompt its results equal one pass's."""

from __future__ import annotations

import mmap
from pathlib import Path

from hermes_ort.core.choices import BlockKind
from hermes_ort.core.errors import OptionError
from hermes_ort.core.manifest import Manifest
from hermes_ort.tensors.kv_cache import decoder_signature

GQA_OP = b"GroupQueryAttention"  # an op_type string in the graph's protobuf


def check_prefill_chunk(chunk: object) -> int | None:
    """`chunk` as positions per prefill pass (None: the whole prompt in one pass), or
    OptionError: it must be a whole number of at least 1."""
    if chunk is None:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise OptionError(
            f"prefill_chunk must be a whole number of positions of at least 1 (or None: the "
            f"whole prompt in one pass), got {chunk!r}"
        )
    return chunk


def prefill_spans(width: int, chunk: int | None) -> list[tuple[int, int]]:
    """The [start, end) positions of each prefill pass over a prompt `width` wide: [(0, width)]
    unless `chunk` is smaller; the last span may be shorter."""
    step = width if chunk is None else min(chunk, width)
    return [(start, min(start + step, width)) for start in range(0, width, step)]


def chunked_prefill_refusal(model_dir: Path, manifest: Manifest, rows: int = 1) -> str | None:
    """Why the decoder's graph cannot take a batch of `rows` prompts in chunks of several
    positions, None if it can. Chunks of one position (the decode step's shape) always work."""
    if decoder_signature(manifest) is None:
        return (
            f"model '{model_dir}' has no KV cache (past_key_values.*): a prompt in chunks needs "
            f"one to carry from chunk to chunk"
        )
    if rows > 1 and uses_group_query_attention(model_dir, manifest):
        return (
            f"model '{model_dir}' is the fused graph: ONNX Runtime's GroupQueryAttention takes "
            f"several new positions after a past only for a batch of 1 ('batch_size must be 1 "
            f"when sequence_length > 1 and past context is given'), and this batch has {rows} "
            f"prompts: prefill it in one pass, or give one prompt at a time, or export with "
            f"--graph optimum"
        )
    return None


def supports_chunked_prefill(model_dir: Path, manifest: Manifest, rows: int = 1) -> bool:
    """Whether a batch of `rows` prompts may be prefilled in chunks (`chunked_prefill_refusal`
    says why not)."""
    return chunked_prefill_refusal(model_dir, manifest, rows) is None


def uses_group_query_attention(model_dir: Path, manifest: Manifest) -> bool:
    """Whether the first layers block's graph runs com.microsoft GroupQueryAttention (the fused
    graph, export/fused.py): its op type is a plain string in the .onnx file (weights live in
    the .data beside it, so the file is small)."""
    layers = next((b for b in manifest.blocks if b.kind == BlockKind.LAYERS), None)
    if layers is None:
        return False
    try:
        with (
            open(Path(model_dir) / layers.path, "rb") as f,
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data,
        ):
            return data.find(GQA_OP) >= 0
    except (OSError, ValueError):  # missing (integrity checks name it), or empty
        return False
