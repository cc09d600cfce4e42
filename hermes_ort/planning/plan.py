"""A plan: the mechanism one model runs with, stated in full, so that the engine, the integrity
checks and the reports read it off the plan and never ask for a strategy's name.

- engine "blocks": `loaders` loading agents open the blocks' sessions in order, at most `window`
  streamed ones alive at once; per block, whether it stays resident, how its session is opened,
  whether it is read ahead and whether the daemon drops its file pages after use.
- engine "whole": one session of the whole-model file `whole`, opened with `whole_settings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hermes_ort.core.manifest import FullModelSpec
from hermes_ort.core.settings import SessionSettings
from hermes_ort.core.units import format_bytes


@dataclass(frozen=True)
class BlockMechanism:
    resident: bool  # its session stays open between passes
    settings: SessionSettings
    readahead: bool  # a loading agent reads its files into the page cache before opening it
    # the daemon drops its own files' pages: a streamed block's after its run, a resident one's
    # after its first run (its weights then live in prepacked copies)
    drop_pages: bool = False


@dataclass(frozen=True)
class Plan:
    strategy: str  # the name it was planned for (reports only)
    engine: str  # "blocks" | "whole"
    loaders: int  # loading agents (threads); 0 for the whole engine
    window: int  # streamed (non-resident) block sessions alive at once, loading ones included
    blocks: tuple[BlockMechanism, ...] = ()  # per manifest block ("blocks" engine)
    lag: int = 1  # executed streamed blocks the daemon may still be destroying as the next runs
    whole: FullModelSpec | None = None  # the file the "whole" engine opens
    whole_settings: SessionSettings | None = None
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    predicted_latency_s: float | None = None  # a repeated pass
    predicted_first_latency_s: float | None = None  # the first pass (every block loads)
    cost_source: str = "estimate"
    reasons: tuple[str, ...] = field(default=())
    # the batch it was planned for (None: the manifest's sample) and the rows each block runs at
    # once (None: the whole batch); each block still runs over the whole batch before the next
    batch_rows: int | None = None
    batch_positions: int | None = None
    micro_batch: int | None = None

    @property
    def resident(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.blocks) if b.resident)

    @property
    def prepack_resident(self) -> tuple[int, ...]:
        return tuple(i for i, b in enumerate(self.blocks) if b.resident and b.settings.prepack)

    def describe(self) -> str:
        if self.engine == "whole":
            prepack = "on" if self.whole_settings and self.whole_settings.prepack else "off"
            head = f"one session of '{self.whole.path}', prepack {prepack}"
        else:
            readahead = "on" if any(b.readahead for b in self.blocks) else "off"
            head = (
                f"{self.loaders} loading agent(s), window {self.window}, "
                f"{len(self.resident)} resident block(s), {self._packing()}, read-ahead {readahead}"
            )
        lines = [f"strategy {self.strategy}: {head}"]
        if self.batch_rows is not None:
            rows = f"{self.micro_batch} row{'s' if self.micro_batch != 1 else ''}"
            micro = f", each block run {rows} at a time" if self.micro_batch else ""
            lines.append(f"batch {self.batch_rows} x {self.batch_positions} positions{micro}")
        if self.budget_bytes is not None:
            lines.append(f"budget {format_bytes(self.budget_bytes)}")
        if self.predicted_peak_bytes is not None:
            lines.append(
                f"predicted ({self.cost_source}): peak {format_bytes(self.predicted_peak_bytes)}, "
                f"first pass {_ms(self.predicted_first_latency_s)}, "
                f"repeated pass {_ms(self.predicted_latency_s)}"
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
        blocks are kept (and prepacked), its predictions and reasons."""
        return {
            "strategy": self.strategy,
            "engine": self.engine,
            "loaders": self.loaders,
            "window": self.window,
            "lag": self.lag,
            "blocks": len(self.blocks),
            "resident": list(self.resident),
            "prepack_resident": list(self.prepack_resident),
            "readahead": [i for i, b in enumerate(self.blocks) if b.readahead],
            "drop_pages": [i for i, b in enumerate(self.blocks) if b.drop_pages],
            "whole": self.whole.path if self.whole else None,
            "budget_bytes": self.budget_bytes,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "predicted_first_latency_s": self.predicted_first_latency_s,
            "predicted_latency_s": self.predicted_latency_s,
            "cost_source": self.cost_source,
            "reasons": list(self.reasons),
            "batch_rows": self.batch_rows,
            "batch_positions": self.batch_positions,
            "micro_batch": self.micro_batch,
        }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"
