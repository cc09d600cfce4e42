"""Batches: the shape of a batch as the plan sees it, how its memory and compute scale against the
manifest's sample, and splitting a block's run into micro-batches (FlexGen's block schedule: each
block runs over the whole batch before the next is loaded, so a pass streams each block once).

The activations between blocks grow with the batch's rows x positions; a block's own intermediates
grow with the rows it runs at once (attention scores with the square of the positions), which is
what a micro-batch bounds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hermes_ort.core.manifest import Manifest


@dataclass(frozen=True)
class BatchShape:
    rows: int  # the batch dimension
    positions: int  # the sequence length (1 for inputs without one)

    def scale(self, sample: BatchShape) -> float:
        """Activation bytes and compute of this batch relative to `sample`'s: linear in rows and
        positions, and in positions once more where they exceed the sample's (attention scores
        are positions x positions)."""
        ratio = self.positions / sample.positions
        return self.rows / sample.rows * ratio * max(1.0, ratio)

    def with_rows(self, rows: int) -> BatchShape:
        return BatchShape(rows, self.positions)


def sample_shape(manifest: Manifest) -> BatchShape:
    """The shape the profile and the cost model were measured at (the manifest's sample)."""
    s = manifest.sample
    return BatchShape(int(s.get("batch_size", 1)), int(s.get("sequence_length", 1)))


def batch_shape(manifest: Manifest, feeds: dict[str, np.ndarray]) -> BatchShape:
    """Rows and positions of checked inputs: the sizes of the dims the manifest names
    `batch_size` and `sequence_length` (the sample's where no input has one)."""
    sizes: dict[str, int] = {}
    for spec in manifest.inputs:
        value = feeds.get(spec.name)
        if value is None:
            continue
        for dim, size in zip(spec.shape, value.shape, strict=False):
            if isinstance(dim, str):
                sizes.setdefault(dim, int(size))
    sample = sample_shape(manifest)
    return BatchShape(
        sizes.get("batch_size", sample.rows), sizes.get("sequence_length", sample.positions)
    )


def _holds_batch_shape(value: np.ndarray, rows: int) -> bool:
    """An integer shape vector whose batch axis (its first entry) is the whole batch's rows
    (-1, "infer", works for any chunk)."""
    is_shape = value.ndim == 1 and 0 < value.size <= 8 and np.issubdtype(value.dtype, np.integer)
    return is_shape and int(value[0]) == rows


def symbolic_first_dim(shape: Sequence[int | str | None] | None) -> bool:
    """Whether a session's declared shape can carry a batch on axis 0 (not a fixed size)."""
    return bool(shape) and not isinstance(shape[0], int)


def micro_batches(rows: int) -> list[int]:
    """Candidate rows per block run: the whole batch, then halves down to 1."""
    out, m = [], rows
    while m >= 1:
        out.append(m)
        if m == 1:
            break
        m = (m + 1) // 2
    return out


def run_in_micro_batches(
    run: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]],
    inputs: dict[str, np.ndarray],
    rows: int,
    micro: int,
    per_row_inputs: set[str] | None = None,
    per_row_outputs: Sequence[bool] | None = None,
) -> list[np.ndarray]:
    """`run` over `inputs` in chunks of `micro` rows along axis 0 of the per-row inputs (those
    the session declares with a symbolic first dim and that have `rows` rows; None: any with
    `rows` rows), the others (masks or constants computed once for all) whole to every chunk;
    outputs joined along axis 0 where per row (`per_row_outputs`, by position; None: where a
    chunk's output has the chunk's rows). A block that reads a shape computed for the whole batch
    (an integer vector holding `rows` that is not per row: optimum's graphs route some) runs
    over the whole batch at once: its chunks would not match it."""

    def per_row(name: str, v: np.ndarray) -> bool:
        declared = per_row_inputs is None or name in per_row_inputs
        return declared and v.ndim >= 1 and v.shape[0] == rows

    split = {k for k, v in inputs.items() if per_row(k, v)}
    whole_shape = any(_holds_batch_shape(v, rows) for k, v in inputs.items() if k not in split)
    if micro >= rows or not split or whole_shape:
        return list(run(inputs))
    joined: list[np.ndarray] = []
    rowwise: list[bool] = []
    for start in range(0, rows, micro):
        chunk = {k: v[start : start + micro] if k in split else v for k, v in inputs.items()}
        values = run(chunk)
        if not joined:  # the outputs allocated once: no second copy of the batch's outputs
            for k, first in enumerate(values):
                per = (
                    per_row_outputs[k]
                    if per_row_outputs is not None
                    else first.ndim >= 1 and first.shape[0] == min(micro, rows)
                )
                rowwise.append(per)
                joined.append(np.empty((rows, *first.shape[1:]), first.dtype) if per else first)
        for k, value in enumerate(values):
            if rowwise[k]:
                joined[k][start : start + micro] = value
        del values
    return joined
