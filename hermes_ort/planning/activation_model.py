"""Activations as a function of the shape a block runs at: what the budget must hold beside the
weights, measured rather than assumed (docs/design.md §2, activations at a batch).

A block's own intermediates while it runs `r` rows of `p` new positions attending to `t`
positions in all (t = p without a KV cache) are fitted to

    transient(r, p, t) = fixed + per_token * r * p + per_pair * r * p * t

(the FFN's 4x-hidden tensors grow with r * p, attention scores with r * p * t). The tensors between
blocks grow with the rows and positions of the pass; a decoder's logits with the rows and the
positions it asks logits for (one, in generation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A probe whose transient is below this is noise (page rounding, allocator slack): never fitted
# to a negative term.
_NOISE_BYTES = 1 << 20


@dataclass(frozen=True)
class ActivationPoint:
    """One measured run: `rows` x `positions` (no KV cache) and the block's transient bytes."""

    rows: int
    positions: int
    transient_bytes: int


@dataclass(frozen=True)
class ActivationFit:
    """A block's transient bytes at any shape (the module docstring's terms; all >= 0)."""

    fixed: float = 0.0
    per_token: float = 0.0
    per_pair: float = 0.0

    def at(self, rows: int, positions: int, attended: int | None = None) -> int:
        t = positions if attended is None else attended
        return int(
            self.fixed + self.per_token * rows * positions + self.per_pair * rows * positions * t
        )

    @classmethod
    def fit(cls, points: tuple[ActivationPoint, ...]) -> ActivationFit:
        """Least squares over the points, terms kept non-negative (a negative one is dropped and
        the rest refitted): extrapolating to a large batch must never shrink a prediction."""
        if not points:
            return cls()
        terms = [0, 1, 2]
        while True:
            a = np.array(
                [
                    [(1.0, p.rows * p.positions, p.rows * p.positions**2)[k] for k in terms]
                    for p in points
                ]
            )
            y = np.array([float(p.transient_bytes) for p in points])
            coef, *_ = np.linalg.lstsq(a, y, rcond=None)
            if all(c >= 0 for c in coef) or len(terms) == 1:
                break
            terms = [t for t, c in zip(terms, coef, strict=True) if c >= 0] or [0]
        values = [0.0, 0.0, 0.0]
        for t, c in zip(terms, coef, strict=True):
            values[t] = max(0.0, float(c))
        if len(terms) == 1 and terms == [0]:
            values[0] = max(float(p.transient_bytes) for p in points)
        return cls(*values)

    def worst_error(self, points: tuple[ActivationPoint, ...]) -> float:
        """The largest |predicted - measured| over the points, as a share of the measured
        (points under a MiB compared with a MiB)."""
        worst = 0.0
        for p in points:
            got = self.at(p.rows, p.positions)
            worst = max(worst, abs(got - p.transient_bytes) / max(p.transient_bytes, _NOISE_BYTES))
        return worst


def fit_points(points: tuple[tuple[int, int, int], ...]) -> ActivationFit | None:
    """The fit of a profile's (rows, positions, bytes) probes; None with fewer than three."""
    if len(points) < 3:
        return None
    return ActivationFit.fit(tuple(ActivationPoint(*p) for p in points))


@dataclass(frozen=True)
class PassShape:
    """What one pass of the engine holds at once: `rows` of the batch (all of them travel between
    blocks), `micro_rows` of them run through a block at a time, `positions` new positions each
    (a prefill chunk, or 1 in decoding) over `attended` positions in all, and logits for
    `logit_positions` of them (1 when only the last is asked for)."""

    rows: int
    positions: int
    micro_rows: int | None = None
    attended: int | None = None
    logit_positions: int | None = None

    @property
    def run_rows(self) -> int:
        return self.micro_rows or self.rows

    @property
    def logits_at(self) -> int:
        return self.positions if self.logit_positions is None else self.logit_positions


@dataclass(frozen=True)
class ActivationModel:
    """Per block: its fit and the bytes in flight while it runs at the sample, split into the
    hidden-sized tensors (grow with rows x positions) and the vocabulary-sized ones (logits: grow
    with rows x logit positions)."""

    sample_rows: int
    sample_positions: int
    fits: tuple[ActivationFit, ...]
    inflight_hidden: tuple[int, ...]
    inflight_vocab: tuple[int, ...]
    fixed_bytes: int = 0  # the engine's own (threads, buffers), whatever the shape

    def block_bytes(self, i: int, shape: PassShape) -> int:
        s_tokens = self.sample_rows * self.sample_positions
        hidden = self.inflight_hidden[i] * shape.rows * shape.positions / s_tokens
        vocab = self.inflight_vocab[i] * shape.rows * shape.logits_at / s_tokens
        own = self.fits[i].at(shape.run_rows, shape.positions, shape.attended)
        return int(own + hidden + vocab)

    def bytes_at(self, shape: PassShape) -> int:
        """The most any block holds at once (its intermediates and everything in flight)."""
        worst = max((self.block_bytes(i, shape) for i in range(len(self.fits))), default=0)
        return self.fixed_bytes + worst

    def inflight_at(self, shape: PassShape) -> int:
        s_tokens = self.sample_rows * self.sample_positions
        return max(
            (
                int(
                    h * shape.rows * shape.positions / s_tokens
                    + v * shape.rows * shape.logits_at / s_tokens
                )
                for h, v in zip(self.inflight_hidden, self.inflight_vocab, strict=True)
            ),
            default=0,
        )
