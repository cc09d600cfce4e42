"""What one run measured: per-block timings and the run's memory and I/O."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class BlockStats:
    name: str
    resident: bool  # its session was kept from an earlier run (no load this run)
    wait_s: float  # time the inference agent waited for this block's session
    readahead_s: float  # loader time reading the block's files
    create_s: float  # loader time creating the ORT session
    run_s: float  # inference time


@dataclass(frozen=True)
class RunStats:
    strategy: str
    loaders: int
    window: int
    latency_s: float  # run() call, loads included
    peak_rss_bytes: int  # VmHWM during the run (reset at its start), baseline included
    rss_before_bytes: int
    rss_after_bytes: int
    bytes_read: int  # from storage, page-cache hits excluded
    max_live_sessions: int  # sessions open at once, resident ones included
    blocks: tuple[BlockStats, ...]

    @property
    def load_s(self) -> float:
        return sum(b.readahead_s + b.create_s for b in self.blocks)

    @property
    def compute_s(self) -> float:
        return sum(b.run_s for b in self.blocks)

    @property
    def wait_s(self) -> float:
        return sum(b.wait_s for b in self.blocks)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(load_s=self.load_s, compute_s=self.compute_s, wait_s=self.wait_s)
        return data
