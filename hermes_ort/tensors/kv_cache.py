"""A decoder's KV-cache signature, read off the manifest (no schema change: the exporter's names).

A decoder exported with its cache takes, per layer i, `past_key_values.i.key/value` of shape
[batch_size, kv_heads, past_sequence_length, head_dim] and returns `present.i.key/value` with the
new tokens appended; its attention mask covers past + new tokens (`total_sequence_length`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from hermes_ort.core.manifest import Manifest

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


@dataclass(frozen=True)
class CacheSlot:
    past: str  # input name, e.g. past_key_values.3.key
    present: str  # output name, e.g. present.3.key
    kv_heads: int
    head_dim: int
    dtype: str


@dataclass(frozen=True)
class DecoderSignature:
    slots: tuple[CacheSlot, ...]  # in layer order, key before value
    takes_position_ids: bool
    logits: str
    max_positions: int | None

    def cache_bytes(self, tokens: int, batch_size: int = 1) -> int:
        """Bytes of the whole KV cache holding `tokens` positions."""
        return sum(
            batch_size * s.kv_heads * tokens * s.head_dim * np.dtype(s.dtype).itemsize
            for s in self.slots
        )

    def empty_cache(self, batch_size: int = 1) -> dict[str, np.ndarray]:
        """The cache of the prompt pass: every past of length 0."""
        return {
            s.past: np.zeros((batch_size, s.kv_heads, 0, s.head_dim), s.dtype) for s in self.slots
        }


def decoder_signature(manifest: Manifest) -> DecoderSignature | None:
    """The KV-cache signature, or None for a model without one (an encoder, or a decoder exported
    without its cache)."""
    outputs = set(manifest.output_names)
    slots = []
    for spec in manifest.inputs:
        m = _PAST.match(spec.name)
        if not m:
            continue
        present = f"present.{m.group(1)}.{m.group(2)}"
        heads, head_dim = spec.shape[1], spec.shape[3]
        if present not in outputs or not isinstance(heads, int) or not isinstance(head_dim, int):
            return None
        slots.append(
            (
                int(m.group(1)),
                m.group(2),
                CacheSlot(spec.name, present, heads, head_dim, spec.dtype),
            )
        )
    names = {spec.name for spec in manifest.inputs}
    if not slots or not {"input_ids", "attention_mask"} <= names or "logits" not in outputs:
        return None
    slots.sort(key=lambda s: (s[0], s[1] != "key"))
    return DecoderSignature(
        slots=tuple(s for _, _, s in slots),
        takes_position_ids="position_ids" in names,
        logits="logits",
        max_positions=manifest.sample.get("max_sequence_length"),
    )


def dim_sizes(sample: dict, batch_size: int, sequence_length: int) -> dict[str, int]:
    """Sizes of the symbolic dims for a pass of `sequence_length` new tokens after the sample's past
    (0 unless the manifest says otherwise)."""
    past = int(sample.get("past_sequence_length", 0))
    return {
        "batch_size": batch_size,
        "sequence_length": sequence_length,
        "past_sequence_length": past,
        "total_sequence_length": past + sequence_length,
    }
