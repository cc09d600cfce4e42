"""Predicts a pass's latency for a plan: an event simulation of the engine's own schedule.

Loads are scheduled in block order on `loaders` agents, each needing one of `window` slots; a slot
comes back when its block has run and been destroyed. The inference agent runs block i when block
i-1 is done and block i is loaded. Resident blocks cost no load on a steady (repeated) pass.
Inference uses every core, so a load's CPU time that overlaps a run lengthens that run."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

DESTROY_S = 0.0005  # munmap + malloc_trim of a streamed session, measured ~0.3-1 ms


@dataclass(frozen=True)
class BlockTimes:
    load_s: float  # read-ahead + session creation
    first_run_s: float  # run right after loading
    steady_run_s: float  # run of a session that stayed open
    load_cpu_s: float = 0.0  # CPU the load burns (session creation, page-cache copies): it stalls
    # a run it overlaps, as inference already uses every core
    first_load_s: float | None = None  # on the first pass, if its files' cache state differs

    def load_time(self, first_pass: bool) -> float:
        return self.first_load_s if first_pass and self.first_load_s is not None else self.load_s


def simulate(
    blocks: Sequence[BlockTimes],
    loaders: int,
    window: int,
    resident: frozenset[int],
    first_pass: bool,
    lag: int = 1,
) -> float:
    """Latency of one pass. On the first pass every block loads (resident ones too). With lag 0
    a block runs only once the previous streamed block has been destroyed."""
    n = len(blocks)
    loads = [i for i in range(n) if first_pass or i not in resident]
    agents = [0.0] * max(1, loaders)
    load_done: dict[int, float] = {}
    release: list[float] = []  # per load, in order: when its slot came back
    exec_end = 0.0
    destroyed = 0.0  # when the last streamed block's destruction ends
    next_load = 0
    load_spans: list[tuple[float, float, float]] = []  # (start, end, cpu) of every load

    def stalled(start: float, run_s: float) -> float:
        """The run's end once overlapping loads have taken their CPU time from it."""
        end = start + run_s
        for a, b, cpu in load_spans:
            overlap = min(b, end) - max(a, start)
            if overlap > 0 and b > a:
                end += cpu * overlap / (b - a)
        return end

    def schedule_loads() -> None:
        nonlocal next_load
        while next_load < len(loads):
            m = next_load
            if m >= window and len(release) <= m - window:
                return  # its slot is held by a block that has not run yet
            slot_t = release[m - window] if m >= window else 0.0
            start = max(slot_t, heapq.heappop(agents))
            done = start + blocks[loads[m]].load_time(first_pass)
            load_spans.append((start, done, min(blocks[loads[m]].load_cpu_s, done - start)))
            heapq.heappush(agents, done)
            load_done[loads[m]] = done
            next_load += 1

    for i in range(n):
        schedule_loads()
        if i in load_done:
            start = max(exec_end, load_done[i], destroyed if lag == 0 else 0.0)
            exec_end = stalled(start, blocks[i].first_run_s)
            release.append(exec_end + (0.0 if i in resident else DESTROY_S))
            if i not in resident:
                destroyed = exec_end + DESTROY_S
        else:
            exec_end = stalled(exec_end, blocks[i].steady_run_s)
    return exec_end
