"""A plan: the mechanism one model runs with, stated in full, so that the engine, the integrity
checks and the reports read it off the plan and never ask for a strategy's name.

A Plan is a Mechanism (what the engine runs) with its report (budget, prediction, reasons,
batch); the engines read the mechanism only.

- engine "blocks": `loaders` loading agents open the blocks' sessions in order, at most `window`
  streamed ones alive at once; per block, whether it stays resident, is paged, how its session is
  opened, whether it is read ahead and whether the daemon drops its file pages after use.
- engine "whole": one session of the whole-model file `whole`, opened with `whole_settings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from hermes_ort.core.choices import Engine, StrategyName
from hermes_ort.core.manifest import FullModelSpec
from hermes_ort.core.settings import SessionSettings
from hermes_ort.core.units import format_bytes


@dataclass(frozen=True)
class BlockMechanism:
    resident: bool  # its session stays open between passes
    settings: SessionSettings
    readahead: bool  # a loading agent reads its files into the page cache before opening it
    # the daemon drops its own files' pages: a streamed block's after its run, a resident one's
    # after its first run (its weights then live in prepacked copies); a paged block's: its saved
    # copy's, after its run
    drop_pages: bool = False
    # streamed, its session opened once on its saved packed copies and kept (streaming/paged.py):
    # its "load" is a prefetch of their pages, and after its run the daemon drops them
    paged: bool = False


@dataclass(frozen=True)
class Mechanism:
    """What the engine is built from, and nothing else: two plans with equal mechanisms run on
    the same engine (a new budget or batch only changes the report and the micro-batch)."""

    engine: Engine
    loaders: int = 0  # loading agents (threads); 0 for the whole engine
    window: int = 1  # streamed (non-resident) block sessions alive at once, loading ones included
    blocks: tuple[BlockMechanism, ...] = ()  # per manifest block (the blocks engine)
    lag: int = 1  # executed streamed blocks the daemon may still be destroying as the next runs
    whole: FullModelSpec | None = None  # the file the whole engine opens
    whole_settings: SessionSettings | None = None

    def engine_key(self) -> Mechanism:
        """The mechanism as an engine sees it: where every block stays resident nothing is
        streamed, so the loaders, window and lag make no difference."""
        if self.blocks and all(b.resident for b in self.blocks):
            return replace(self, loaders=0, window=0, lag=0)
        return self


@dataclass(frozen=True)
class Prediction:
    """What the cost model predicts of a plan (None: nothing predicted, e.g. the whole engine)."""

    peak_bytes: int | None = None
    latency_s: float | None = None  # a repeated pass
    first_latency_s: float | None = None  # the first pass (every block loads)
    cost_source: str = "estimate"  # "estimate" (file sizes) or "profile" (measured)


@dataclass(frozen=True)
class BatchRun:
    """The batch a plan was made for (None: the manifest's sample) and the rows each block runs
    at once (None: the whole batch); each block still runs over the whole batch before the next."""

    rows: int | None = None
    positions: int | None = None
    micro_batch: int | None = None
    # a decoder's prompt prefilled this many positions per pass (its KV cache carried from
    # chunk to chunk), None: the whole prompt in one pass
    prefill_chunk: int | None = None


@dataclass(frozen=True)
class Plan:
    """A mechanism and its report: the strategy it was planned for, the budget, the
    predictions, the reasons and the batch."""

    strategy: StrategyName
    mechanism: Mechanism
    budget_bytes: int | None = None
    prediction: Prediction = field(default_factory=Prediction)
    reasons: tuple[str, ...] = ()
    batch: BatchRun = field(default_factory=BatchRun)

    # the mechanism's fields, read through (the engines and reports use them)
    @property
    def engine(self) -> Engine:
        return self.mechanism.engine

    @property
    def loaders(self) -> int:
        return self.mechanism.loaders

    @property
    def window(self) -> int:
        return self.mechanism.window

    @property
    def blocks(self) -> tuple[BlockMechanism, ...]:
        return self.mechanism.blocks

    @property
    def lag(self) -> int:
        return self.mechanism.lag

    @property
    def whole(self) -> FullModelSpec | None:
        return self.mechanism.whole

    @property
    def whole_settings(self) -> SessionSettings | None:
        return self.mechanism.whole_settings

    @property
    def resident(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.blocks) if b.resident)

    @property
    def paged(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.blocks) if b.paged)

    @property
    def prepack_resident(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.blocks) if b.resident and b.settings.prepack)

    def describe(self) -> str:
        if self.engine == Engine.WHOLE:
            prepack = "on" if self.whole_settings and self.whole_settings.prepack else "off"
            head = f"one session of '{self.whole.path}', prepack {prepack}"
        else:
            readahead = "on" if any(b.readahead for b in self.blocks) else "off"
            paged = f", {len(self.paged)} paged" if self.paged else ""
            head = (
                f"{self.loaders} loading agent(s), window {self.window}, "
                f"{len(self.resident)} resident block(s){paged}, {self._packing()}, "
                f"read-ahead {readahead}"
            )
        lines = [f"strategy {self.strategy}: {head}"]
        b = self.batch
        if b.rows is not None:
            rows = f"{b.micro_batch} row{'s' if b.micro_batch != 1 else ''}"
            micro = f", each block run {rows} at a time" if b.micro_batch else ""
            chunk = f", prefilled {b.prefill_chunk} positions a pass" if b.prefill_chunk else ""
            lines.append(f"batch {b.rows} x {b.positions} positions{micro}{chunk}")
        if self.budget_bytes is not None:
            lines.append(f"budget {format_bytes(self.budget_bytes)}")
        p = self.prediction
        if p.peak_bytes is not None:
            lines.append(
                f"predicted ({p.cost_source}): peak {format_bytes(p.peak_bytes)}, "
                f"first pass {_ms(p.first_latency_s)}, repeated pass {_ms(p.latency_s)}"
            )
        lines += [f"- {r}" for r in self.reasons]
        return "\n".join(lines)

    def _packing(self) -> str:
        streamed = [b for b in self.blocks if not b.resident]
        kept = len(self.prepack_resident)
        packed = any(b.settings.prepack for b in streamed) if streamed else kept == len(self.blocks)
        text = f"prepack {'on' if packed else 'off'}"
        return text + (f" (on for {kept} resident)" if kept and not packed else "")

    def to_json(self) -> dict[str, Any]:
        """The plan as a JSON record (`hermes-ort run --json`, benchmarks): its shape, which
        blocks are kept (and prepacked) and paged, its predictions and reasons."""
        return {
            "strategy": self.strategy,
            "engine": self.engine,
            "loaders": self.loaders,
            "window": self.window,
            "lag": self.lag,
            "blocks": len(self.blocks),
            "resident": list(self.resident),
            "prepack_resident": list(self.prepack_resident),
            "paged": list(self.paged),
            "readahead": [i for i, b in enumerate(self.blocks) if b.readahead],
            "drop_pages": [i for i, b in enumerate(self.blocks) if b.drop_pages],
            "whole": self.whole.path if self.whole else None,
            "budget_bytes": self.budget_bytes,
            "predicted_peak_bytes": self.prediction.peak_bytes,
            "predicted_first_latency_s": self.prediction.first_latency_s,
            "predicted_latency_s": self.prediction.latency_s,
            "cost_source": self.prediction.cost_source,
            "reasons": list(self.reasons),
            "batch_rows": self.batch.rows,
            "batch_positions": self.batch.positions,
            "micro_batch": self.batch.micro_batch,
            "prefill_chunk": self.batch.prefill_chunk,
        }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"
