"""A run's timeline as spans (who did what, when) and its Chrome trace-event JSON, which Perfetto
(ui.perfetto.dev) and chrome://tracing open: one row per thread (the inference agent, each loading
agent, the daemon), one slice per read-ahead, session creation, wait, run and free."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

KINDS = ("open", "read", "create", "wait", "run", "free", "pass")  # open: load()'s checks, plan


@dataclass(frozen=True)
class Span:
    block: str  # the block's name ("" for a whole pass)
    kind: str  # one of KINDS
    thread: str
    start_s: float  # time.perf_counter()
    end_s: float


class Trace:
    """Spans recorded from any thread (appending to a list is atomic under the GIL). Off, `add`
    records nothing: a model run for hours keeps no growing list."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.spans: list[Span] = []

    def add(self, block: str, kind: str, start_s: float, end_s: float | None = None) -> None:
        if not self.enabled:
            return
        end = time.perf_counter() if end_s is None else end_s
        self.spans.append(Span(block, kind, threading.current_thread().name, start_s, end))

    def take(self) -> tuple[Span, ...]:
        """The spans recorded so far, and a fresh start."""
        spans, self.spans = self.spans, []
        return tuple(spans)


def thread_order(name: str) -> tuple[int, str]:
    """The inference agent first, then the loading agents, then the daemon."""
    rank = 1 if name.startswith("hermes-loader") else 2 if name.startswith("hermes-daemon") else 0
    return rank, name


def chrome_trace(spans: tuple[Span, ...] | list[Span], origin_s: float | None = None) -> dict:
    """The trace-event JSON of `spans`: complete events ("ph": "X") in microseconds from
    `origin_s` (default: the first span's start), one tid per thread, named by metadata events."""
    if origin_s is None:
        origin_s = min((s.start_s for s in spans), default=0.0)
    pid = os.getpid()
    threads = sorted({s.thread for s in spans}, key=thread_order)
    tid = {name: i + 1 for i, name in enumerate(threads)}
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": "hermes-ort"}}
    ]
    for name in threads:
        label = "inference agent" if thread_order(name)[0] == 0 else name
        events.append(
            {
                "ph": "M",
                "name": "thread_name",
                "pid": pid,
                "tid": tid[name],
                "args": {"name": label},
            }
        )
        events.append(
            {
                "ph": "M",
                "name": "thread_sort_index",
                "pid": pid,
                "tid": tid[name],
                "args": {"sort_index": tid[name]},
            }
        )
    for s in sorted(spans, key=lambda s: s.start_s):
        events.append(
            {
                "ph": "X",
                "name": f"{s.kind} {s.block}".strip(),
                "cat": s.kind,
                "pid": pid,
                "tid": tid[s.thread],
                "ts": round((s.start_s - origin_s) * 1e6, 1),
                "dur": round(max(0.0, s.end_s - s.start_s) * 1e6, 1),
                "args": {"block": s.block},
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def summarise(spans: tuple[Span, ...] | list[Span]) -> dict[str, float]:
    """Seconds per kind of span, summed over threads (`read`, `create`, ...), and the wall time
    from the first span's start to the last one's end."""
    totals = {k: 0.0 for k in KINDS}
    for s in spans:
        totals[s.kind] += s.end_s - s.start_s
    if spans:
        totals["wall"] = max(s.end_s for s in spans) - min(s.start_s for s in spans)
    return totals
