"""Cost models built by hand for the planner's and the cost model's tests."""

from __future__ import annotations

from dataclasses import replace

from hermes_ort.planning.cost_model import BlockCost, CostModel


def column(c: CostModel, field: str) -> tuple:
    """One field of every block's cost."""
    return tuple(getattr(b, field) for b in c.blocks)


def with_columns(c: CostModel, **columns) -> CostModel:
    """`c` with per-block fields replaced from tuples (one value per block)."""
    blocks = tuple(
        replace(b, **{k: v[i] for k, v in columns.items()}) for i, b in enumerate(c.blocks)
    )
    return replace(c, blocks=blocks)


def block_costs(live, open_, stream, resident=None, plain=None) -> tuple[BlockCost, ...]:
    """Blocks streamed and kept at their live size, nothing prepacked."""
    return tuple(
        BlockCost(
            live_bytes=x,
            open_bytes=open_,
            resident_bytes=x,
            mapped_live_bytes=x,
            resident_prepack=False,
            stream_prepack=False,
            sparse=False,
            stream_times=stream,
            resident_times=resident or stream,
            plain_resident_times=plain or resident or stream,
        )
        for x in live
    )
