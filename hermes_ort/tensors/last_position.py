"""Last-position logits: generation reads only the last position's logits, and a decoder's head is
position-wise (the epilogue: final norm and LM head; exported with --head-slices, the epilogue
ending at the final norm, the HEAD blocks of vocabulary slices and `head_concat` joining them), so
its blocks may be fed the last position alone: the prompt pass's logits are then [rows, 1, vocab],
not [rows, positions, vocab] (8 prompts x 512 positions x 50,257 x 4 B = 823 MB for gpt2).
Prompts are left-padded (generation/token_loop.py), so the last column is every row's last real
token.

Only the copy fed to such a block is cut; the tensors other blocks read stay whole."""

from __future__ import annotations

import numpy as np

from hermes_ort.core.choices import BlockKind
from hermes_ort.core.manifest import Manifest
from hermes_ort.tensors.kv_cache import decoder_signature

_HEAD_KINDS = (BlockKind.HEAD, BlockKind.EPILOGUE)


def position_wise_blocks(manifest: Manifest) -> frozenset[int]:
    """Indices of the blocks that may run on the last position only: in a decoder (a manifest
    with a KV cache; encoders never), the HEAD and EPILOGUE blocks whose every output is the
    `logits` or is read only by such blocks, so that nothing but the logits comes out cut (no
    other model output, nothing a layer reads). Their ops are per position (norms, the head's
    MatMul, the slices' Concat along the vocabulary)."""
    sig = decoder_signature(manifest)
    if sig is None:
        return frozenset()
    readers: dict[str, set[int]] = {}
    for i, spec in enumerate(manifest.blocks):
        for name in spec.inputs:
            readers.setdefault(name, set()).add(i)
    others = set(manifest.output_names) - {sig.logits}
    found: set[int] = set()
    for i in reversed(range(len(manifest.blocks))):  # readers come later: decided first
        spec = manifest.blocks[i]
        if spec.kind not in _HEAD_KINDS:
            continue
        if all(
            name == sig.logits or (name not in others and readers.get(name, set()) <= found)
            for name in spec.outputs
        ):
            found.add(i)
    return frozenset(found)


def last_position_inputs(
    inputs: dict[str, np.ndarray], rows: int, positions: int
) -> dict[str, np.ndarray]:
    """A position-wise block's inputs at the last position: each [rows, positions, ...] as
    [rows, 1, ...] (a copy: the whole one stays for other readers), and a shape vector
    (rows, positions, ...) that reshapes them as (rows, 1, ...).
    Anything else, and inputs already of one position (a HEAD slice's [rows, 1, V_k]), as is."""
    if positions <= 1:
        return inputs
    out = {}
    for name, value in inputs.items():
        if value.ndim >= 3 and value.shape[:2] == (rows, positions):
            value = np.ascontiguousarray(value[:, -1:])
        elif _is_shape_of(value, rows, positions):
            value = value.copy()
            value[1] = 1
        out[name] = value
    return out


def _is_shape_of(value: np.ndarray, rows: int, positions: int) -> bool:
    """An integer vector (rows, positions, more...): a Reshape's target [rows, positions, ...],
    its rows possibly -1 (inferred) or 0 (copied): optimum's gpt2 head reads (-1, T, hidden)."""
    is_shape = value.ndim == 1 and 3 <= value.size <= 8 and np.issubdtype(value.dtype, np.integer)
    return is_shape and int(value[0]) in (rows, -1, 0) and int(value[1]) == positions


def last_logits_only(outputs: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """The outputs with `name` ([rows, positions, vocab]) as its last position [rows, 1, vocab]:
    where the blocks could not be fed the last position alone (the whole engine; a head whose
    inputs are not [rows, positions, ...]), the result is the same, the memory not saved."""
    logits = outputs.get(name)
    if logits is None or logits.ndim < 3 or logits.shape[1] == 1:
        return outputs
    return {**outputs, name: np.ascontiguousarray(logits[:, -1:])}
