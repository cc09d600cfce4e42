"""The KV cache of a running batch whose rows join and leave between decode steps (the server's
continuous batching): each row prefilled alone, its cache merged in; a finished row taken out.

Every pass feeds one new token per row after a past of `width` positions, of which row b holds
`lengths[b]` real ones. Where they sit depends on how the graph writes its present:

    CONCAT   optimum's graphs append the new position after the whole past (present = past ++
             new), so rows are left-padded: row b's real positions are the last lengths[b] of
             the past, its mask 0 before them; position ids say where each row is.
    SEQLENS  the fused graph's GroupQueryAttention writes row b's new position right after its
             own lengths[b] (seqlens_k = mask sum - 1, present as wide as the mask), so rows are
             right-padded: real positions first, the mask's ones first.

Arrays are [rows, kv_heads, width, head_dim] per past name, float as the graph's.

Batch invariance: ONNX Runtime's MatMulNBits (int8 activations) takes another kernel for one row
than for several, whose logits differ (0.5 of 20 on SmolLM2-135M Q4_1), while any row of 2..8 gets
the same bits whatever the others hold. So the batch never runs below `min_rows`: ballast rows of
no past (length 0, their mask the new position alone, their outputs dropped) fill it, and a
request's tokens are the same alone as beside seven others (docs/design.md §2.9).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hermes_ort.core.choices import CacheLayout
from hermes_ort.tensors.kv_cache import DecoderSignature


class BatchCache:
    """The past of every running row, and the feeds of the next decode step. Rows [0, rows) are
    the requests', in the order they joined (less those that left); ballast rows follow."""

    def __init__(self, sig: DecoderSignature, layout: CacheLayout, min_rows: int = 2) -> None:
        self.sig, self.layout, self.min_rows = sig, layout, min_rows
        self.lengths: list[int] = []  # real positions of each request's row
        self.arrays: dict[str, np.ndarray] = sig.empty_cache(0)  # requests' rows, then ballast

    @property
    def rows(self) -> int:
        """Requests' rows (ballast not counted)."""
        return len(self.lengths)

    @property
    def batch_rows(self) -> int:
        """Rows a step runs: the requests' and the ballast."""
        return int(next(iter(self.arrays.values())).shape[0])

    @property
    def width(self) -> int:
        return int(next(iter(self.arrays.values())).shape[2])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def add(self, cache: Mapping[str, np.ndarray]) -> int:
        """A row joins with the cache its prefill returned (every past name [1, kv_heads, L,
        head_dim], all L positions real); returns its index (the last request's)."""
        length = int(next(iter(cache.values())).shape[2])
        width = max(self.width, length)
        rows = self.rows
        self.arrays = {
            name: np.concatenate(
                [self._padded(a[:rows], width), self._padded(cache[name], width)], axis=0
            )
            for name, a in self.arrays.items()
        }
        self.lengths.append(length)
        self._ballast()
        return self.rows - 1

    def remove(self, *indices: int) -> None:
        """Rows `indices` leave (the rows after them move up); the width shrinks to the rows
        left, so a long row gone frees its positions. One copy of the cache however many leave
        (rows of the same max_tokens end at the same step)."""
        gone = set(indices)
        keep = [r for r in range(self.rows) if r not in gone]
        self.lengths = [self.lengths[r] for r in keep]
        cut = self._used_columns()
        self.arrays = {
            name: (a if cut is None else a[:, :, cut])[keep] for name, a in self.arrays.items()
        }
        self._ballast()

    def clear(self) -> None:
        """Every row gone (after a failed pass, whose presents never came)."""
        self.lengths = []
        self.arrays = self.sig.empty_cache(0)

    def step_feeds(self, tokens: list[int]) -> dict[str, np.ndarray]:
        """The feeds of one decode step: `tokens` (one per request's row) after every row's
        past; a ballast row gets token 0 after no past."""
        width, ballast = self.width, self.batch_rows - self.rows
        lengths = np.array(self.lengths + [0] * ballast, np.int64)[:, None]  # [batch_rows, 1]
        column = np.arange(width + 1)[None, :]  # [1, width + 1]
        if self.layout == CacheLayout.SEQLENS:
            mask = column <= lengths  # real positions, then the new one
        else:
            mask = column >= width - lengths  # the last lengths[b] of the past, and the new one
        feeds = {
            "input_ids": np.array(list(tokens) + [0] * ballast, np.int64)[:, None],
            "attention_mask": mask.astype(np.int64),
            **self.arrays,
        }
        if self.sig.takes_position_ids:
            feeds["position_ids"] = lengths  # the new token's position: the row's length
        return feeds

    def update(self, outputs: Mapping[str, np.ndarray]) -> None:
        """The step's presents become the past; every request's row is one position longer
        (a ballast row stays at none: its new position is never attended to)."""
        self.arrays = {s.past: outputs[s.present] for s in self.sig.slots}
        self.lengths = [n + 1 for n in self.lengths]
        self._trim()

    def _ballast(self) -> None:
        """Ballast rows (zeros, no past) while there are requests but fewer than min_rows; none
        once there are enough, or none left."""
        rows = self.rows
        want = 0 if rows == 0 else max(0, self.min_rows - rows)
        have = self.batch_rows - rows
        if want == have:
            return
        self.arrays = {
            name: np.concatenate([a[:rows], np.zeros((want, *a.shape[1:]), a.dtype)], axis=0)
            for name, a in self.arrays.items()
        }

    def _padded(self, a: np.ndarray, width: int) -> np.ndarray:
        """`a` [rows, heads, w, dim] padded with zeros to `width` on the side its layout pads."""
        pad = width - a.shape[2]
        if pad == 0:
            return a
        side = (pad, 0) if self.layout == CacheLayout.CONCAT else (0, pad)
        return np.pad(a, ((0, 0), (0, 0), side, (0, 0)))

    def _used_columns(self) -> slice | None:
        """The columns some row uses (its real positions), None if every column is."""
        longest = max(self.lengths, default=0)
        extra = self.width - longest
        if extra <= 0:
            return None
        return slice(extra, None) if self.layout == CacheLayout.CONCAT else slice(0, longest)

    def _trim(self) -> None:
        """Drop the columns no row uses (padding only), so the width is the longest row's."""
        cut = self._used_columns()
        if cut is not None:
            self.arrays = {n: np.ascontiguousarray(a[:, :, cut]) for n, a in self.arrays.items()}


def cache_layout(uses_group_query_attention: bool) -> CacheLayout:
    """How a graph writes its present (see the module's docstring)."""
    return CacheLayout.SEQLENS if uses_group_query_attention else CacheLayout.CONCAT
