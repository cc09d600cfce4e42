"""The pipeline planner: how many loading agents, how large a window, which blocks stay resident.

A plan is checked against the memory budget with a cost model: the process's baseline resident set,
each block's resident bytes while its session is live, and the activations of a pass.

    predicted peak = baseline + sum(resident blocks) + max(sum of `window` consecutive streamed
                     blocks) + activations
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hermes_ort.errors import BudgetError
from hermes_ort.manifest import Manifest
from hermes_ort.sessions import ORT_DEFAULT, STREAMING, SessionSettings, default_threads
from hermes_ort.units import format_bytes

STRATEGIES = ("pipeload", "full", "full-mmap", "pipeswitch", "ondemand")
LOAD_PATHS = (
    "default",
    "stream",
)  # ORT's default load path / pipeload's (mmap, no prepack, read-ahead)

SESSION_OVERHEAD_BYTES = 2 << 20  # an open session's own structures, beyond its weights
ACTIVATION_RESERVE_BYTES = 16 << 20  # intermediate tensors and ORT's arena, beyond the outputs
MAX_LOADERS = 4  # 2 loaders load 1.9x faster on 2 cores, 4 add nothing (DESIGN.md §2)


@dataclass(frozen=True)
class CostModel:
    """What the planner knows about a model on this machine (estimates until profiled)."""

    baseline_bytes: int  # resident set of the process before any block is loaded
    block_bytes: tuple[int, ...]  # resident bytes of each block while its session is live
    activation_bytes: int  # peak of intermediate tensors + outputs during a pass
    source: str = "estimate"  # "estimate" (from file sizes) or "profile"

    @classmethod
    def estimate(cls, manifest: Manifest, baseline_bytes: int, output_bytes: int = 0) -> CostModel:
        """Upper-bound estimates from file sizes: every weight page may become resident."""
        return cls(
            baseline_bytes=baseline_bytes,
            block_bytes=tuple(b.bytes + SESSION_OVERHEAD_BYTES for b in manifest.blocks),
            activation_bytes=2 * output_bytes + ACTIVATION_RESERVE_BYTES,
        )

    @property
    def model_bytes(self) -> int:
        return sum(self.block_bytes)

    def min_budget(self) -> int:
        """Smallest budget that can run at all: one block live at a time, nothing kept."""
        return self.baseline_bytes + max(self.block_bytes) + self.activation_bytes

    def peak(self, resident: tuple[int, ...], window: int) -> int:
        keep = set(resident)
        streamed = [b if i not in keep else 0 for i, b in enumerate(self.block_bytes)]
        widest = max(sum(streamed[i : i + window]) for i in range(len(streamed)))
        return (
            self.baseline_bytes
            + sum(self.block_bytes[i] for i in keep)
            + widest
            + self.activation_bytes
        )


@dataclass(frozen=True)
class Plan:
    strategy: str
    loaders: int  # loading agents (threads)
    window: int  # streamed (non-resident) block sessions alive at once, loading ones included
    resident: tuple[int, ...]  # blocks whose sessions stay open between runs
    prepack: bool  # ORT weight prepacking (copies weights into anonymous memory)
    readahead: bool  # loaders read a block's files before opening it
    drop_cache: bool  # the daemon drops streamed blocks' file pages after use
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    reasons: tuple[str, ...] = ()

    @property
    def settings(self) -> SessionSettings:
        return STREAMING if not self.prepack else ORT_DEFAULT

    @property
    def whole_model(self) -> bool:
        return self.strategy in ("full", "full-mmap")

    def describe(self) -> str:
        lines = [
            f"strategy {self.strategy}: {self.loaders} loading agent(s), window {self.window}, "
            f"{len(self.resident)} resident block(s), prepack {'on' if self.prepack else 'off'}, "
            f"read-ahead {'on' if self.readahead else 'off'}",
        ]
        if self.budget_bytes is not None:
            lines.append(
                f"budget {format_bytes(self.budget_bytes)}, predicted peak {format_bytes(self.predicted_peak_bytes)}"
            )
        lines += [f"- {r}" for r in self.reasons]
        return "\n".join(lines)


def check_budget(cost: CostModel, budget: int | None, block_names: tuple[str, ...]) -> None:
    if budget is None:
        return
    need = cost.min_budget()
    if need > budget:
        largest = max(range(len(cost.block_bytes)), key=lambda i: cost.block_bytes[i])
        raise BudgetError(
            f"memory budget {format_bytes(budget)} cannot hold block '{block_names[largest]}' "
            f"({format_bytes(cost.block_bytes[largest])}) plus the process baseline "
            f"({format_bytes(cost.baseline_bytes)}) and activations ({format_bytes(cost.activation_bytes)}); "
            f"the smallest workable budget is {format_bytes(need)} ({need} bytes)"
        )


def plan_pipeload(
    cost: CostModel,
    budget: int | None,
    cores: int = 0,
    loaders: int | None = None,
    window: int | None = None,
) -> Plan:
    """Choose loaders, window and resident blocks for `pipeload` under `budget`."""
    n = len(cost.block_bytes)
    cores = cores or default_threads()
    k = loaders or max(1, min(cores, MAX_LOADERS, n))
    base = Plan(
        "pipeload",
        k,
        0,
        (),
        prepack=False,
        readahead=True,
        drop_cache=budget is not None,
        budget_bytes=budget,
    )
    everything = tuple(range(n))
    if window is None and (budget is None or cost.peak(everything, 1) <= budget):
        why = (
            "no budget"
            if budget is None
            else f"the whole model ({format_bytes(cost.model_bytes)}) fits the budget"
        )
        return replace(
            base,
            window=window or n,
            resident=everything,
            predicted_peak_bytes=cost.peak(everything, 1),
            reasons=(
                f"{why}: every block stays resident after its first load",
                f"{k} loading agent(s) for {cores} core(s)",
            ),
        )
    # Streaming: a window of k+1 lets k agents load while one block runs; shrink it to fit.
    w = min(window or k + 1, n)
    if budget is None:
        return replace(
            base,
            window=w,
            predicted_peak_bytes=cost.peak((), w),
            reasons=(f"window {w} as asked, nothing resident",),
        )
    while window is None and w > 1 and cost.peak((), w) > budget:
        w -= 1
    if cost.peak((), w) > budget:
        raise BudgetError(
            f"window {window} needs {format_bytes(cost.peak((), window))}, over the budget {format_bytes(budget)}"
        )
    reasons = [
        f"{k} loading agent(s) for {cores} core(s); window {w}: the largest up to {k + 1} that fits"
    ]
    # Keep blocks resident, first ones first, while the budget still holds: they are never re-read.
    resident: tuple[int, ...] = ()
    for i in range(n):
        if cost.peak((*resident, i), w) <= budget:
            resident = (*resident, i)
    if resident:
        reasons.append(
            f"{len(resident)} of {n} blocks stay resident between runs; {n - len(resident)} are streamed each run"
        )
    k = min(k, max(1, n - len(resident)))
    return replace(
        base,
        loaders=k,
        window=w,
        resident=resident,
        predicted_peak_bytes=cost.peak(resident, w),
        reasons=tuple(reasons),
    )


def plan_strategy(
    strategy: str,
    cost: CostModel,
    budget: int | None,
    load_path: str = "default",
    loaders: int | None = None,
    window: int | None = None,
) -> Plan:
    """The plan of any strategy; the baselines are fixed mechanisms (DESIGN.md §1)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    if load_path not in LOAD_PATHS:
        raise ValueError(f"unknown load_path '{load_path}' (choose from {', '.join(LOAD_PATHS)})")
    n = len(cost.block_bytes)
    stream = load_path == "stream"
    if strategy == "pipeload":
        return plan_pipeload(cost, budget, loaders=loaders, window=window)
    if strategy in ("full", "full-mmap"):
        return Plan(
            strategy,
            0,
            1,
            (),
            prepack=strategy == "full",
            readahead=False,
            drop_cache=False,
            budget_bytes=budget,
            reasons=("one ONNX Runtime session of the whole model",),
        )
    if strategy == "pipeswitch":  # one loader, in order, overlapped with execution, everything kept
        return Plan(
            strategy,
            loaders or 1,
            window or n,
            tuple(range(n)),
            prepack=not stream,
            readahead=stream,
            drop_cache=False,
            budget_bytes=budget,
            predicted_peak_bytes=cost.peak(tuple(range(n)), 1),
            reasons=("blocks loaded in order by one loader and all kept resident (PipeSwitch)",),
        )
    # ondemand: load a block, run it, free it; window 2 = one block of prefetch (AirLLM)
    w = window or 1
    return Plan(
        strategy,
        loaders or 1,
        w,
        (),
        prepack=not stream,
        readahead=stream,
        drop_cache=False,
        budget_bytes=budget,
        predicted_peak_bytes=cost.peak((), w),
        reasons=(f"load, run, free each block; {w - 1} block(s) of prefetch (AirLLM)",),
    )
