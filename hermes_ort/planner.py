"""The pipeline planner: how many loading agents, how large a window, which blocks stay resident
and which are prepacked, under a memory budget; and the fixed plans of the baselines.

`plan_pipeload` searches loaders x window, fills the rest of the budget with resident blocks (most
time saved per byte first), and keeps the plan with the lowest predicted latency of the objective's
pass: a repeated pass (default) or the first (one-shot); plans within 3% of it are a tie, won by the
faster other pass (then the lowest peak). Costs come from the cost model (costmodel.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hermes_ort.costmodel import CostModel, room, within_margin
from hermes_ort.errors import BudgetError
from hermes_ort.sessions import (
    ORT_DEFAULT,
    PREPACKED_STREAMING,
    STREAMING,
    SessionSettings,
    default_threads,
)
from hermes_ort.units import format_bytes

STRATEGIES = ("pipeload", "full", "full-mmap", "pipeswitch", "ondemand")
LOAD_PATHS = ("default", "stream")  # ORT's default load / pipeload's (mmap, no prepack, read-ahead)
MAX_LOADERS = 4  # 2 loaders load 1.9x faster on 2 cores, 4 add nothing (DESIGN.md §2)
MAX_WINDOW = 8
PASS_TIE = 0.03  # plans whose objective's pass is predicted this close are a tie
OBJECTIVES = ("repeated", "one-shot")  # what the plan makes fastest: later passes, or the first


@dataclass(frozen=True)
class Plan:
    strategy: str
    loaders: int  # loading agents (threads)
    window: int  # streamed (non-resident) block sessions alive at once, loading ones included
    resident: tuple[int, ...]  # blocks whose sessions stay open between runs
    prepack: (
        bool  # ORT weight prepacking for streamed blocks (copies weights into anonymous memory)
    )
    readahead: bool  # loaders read a block's files before opening it
    drop_cache: bool  # the daemon drops streamed blocks' file pages after use
    budget_bytes: int | None = None
    no_readahead: tuple[
        int, ...
    ] = ()  # sparse blocks (embedding lookups): pages fault in on demand
    lag: int = 1  # executed streamed blocks the daemon may still be destroying while the next runs
    prepack_resident: tuple[int, ...] = ()  # resident blocks opened with prepacking (pipeload)
    predicted_peak_bytes: int | None = None
    predicted_latency_s: float | None = None  # a repeated pass
    predicted_first_latency_s: float | None = None  # the first pass (every block loads)
    cost_source: str = "estimate"
    reasons: tuple[str, ...] = field(default=())

    @property
    def whole_model(self) -> bool:
        return self.strategy in ("full", "full-mmap")

    def reads_ahead(self, block: int) -> bool:
        return self.readahead and block not in self.no_readahead

    def settings_for(self, block: int) -> SessionSettings:
        if self.strategy != "pipeload":
            return ORT_DEFAULT if self.prepack else STREAMING
        return PREPACKED_STREAMING if block in self.prepack_resident else STREAMING

    def describe(self) -> str:
        lines = [
            f"strategy {self.strategy}: {self.loaders} loading agent(s), window {self.window}, "
            f"{len(self.resident)} resident block(s), prepack {'on' if self.prepack else 'off'}"
            f"{f' (on for {len(self.prepack_resident)} resident)' if self.prepack_resident else ''}, "
            f"read-ahead {'on' if self.readahead else 'off'}"
        ]
        if self.budget_bytes is not None:
            lines.append(f"budget {format_bytes(self.budget_bytes)}")
        if self.predicted_peak_bytes is not None:
            lines.append(
                f"predicted ({self.cost_source}): peak {format_bytes(self.predicted_peak_bytes)}, "
                f"first pass {_ms(self.predicted_first_latency_s)}, repeated pass {_ms(self.predicted_latency_s)}"
            )
        lines += [f"- {r}" for r in self.reasons]
        return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def check_budget(cost: CostModel, budget: int | None, block_names: tuple[str, ...]) -> None:
    """Refuse a budget that cannot hold the largest block plus its activations, naming both."""
    if budget is None:
        return
    need = cost.min_budget()
    if need > budget:
        largest = max(range(cost.blocks), key=lambda i: cost.live_bytes[i])
        raise BudgetError(
            f"memory budget {format_bytes(budget)} cannot hold block '{block_names[largest]}' "
            f"({format_bytes(cost.live_bytes[largest])}) plus the process baseline "
            f"({format_bytes(cost.baseline_bytes)}) and activations ({format_bytes(cost.activation_bytes)}); "
            f"the smallest workable budget is {format_bytes(need)} ({need} bytes)"
        )


def _fill_resident(cost: CostModel, budget: int | None, window: int, lag: int) -> tuple[int, ...]:
    """Blocks to keep, most time saved per byte first, while the peak stays within the budget."""
    everything = tuple(range(cost.blocks))
    if budget is None or cost.peak(everything, window, lag) <= budget:
        return everything

    def saved_per_byte(i: int) -> float:
        s, r = cost.stream_times[i], cost.resident_times[i]
        return (s.load_s + s.first_run_s - r.steady_run_s) / max(1, cost.resident_bytes[i])

    resident: tuple[int, ...] = ()
    for i in sorted(everything, key=saved_per_byte, reverse=True):
        candidate = tuple(sorted((*resident, i)))
        if cost.peak(candidate, window, lag) <= budget:
            resident = candidate
    return resident


def _prepack_within(
    cost: CostModel,
    plain: CostModel,
    budget: int | None,
    window: int,
    lag: int,
    resident: tuple[int, ...],
    loaders: int,
) -> frozenset[int]:
    """Resident blocks to prepack, most run time saved per extra byte first, within the budget.
    `plain`: the same costs with nothing prepacked."""
    candidates = [i for i in resident if cost.resident_prepack[i]]
    if budget is None:
        return frozenset(candidates)

    def gain(i: int) -> float:
        saved = plain.resident_times[i].steady_run_s - cost.resident_times[i].steady_run_s
        return saved / max(1, cost.resident_bytes[i] - cost.live_bytes[i])

    chosen: frozenset[int] = frozenset()
    for i in sorted(candidates, key=gain, reverse=True):
        trial = chosen | {i}
        if cost.with_prepack(trial).peak(resident, window, lag, loaders) <= budget:
            chosen = trial
    return chosen


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective '{objective}' (choose from {', '.join(OBJECTIVES)})")


@dataclass(frozen=True)
class _Option:
    """One candidate plan: its shape, the costs it runs with, and their predictions."""

    loaders: int
    window: int
    lag: int
    resident: tuple[int, ...]
    cost: CostModel  # with the chosen blocks prepacked
    unpacked: bool  # prepacking left out for the first pass's sake
    steady: float
    first: float
    peak: int


def plan_pipeload(
    cost: CostModel,
    budget: int | None,
    cores: int = 0,
    loaders: int | None = None,
    window: int | None = None,
    objective: str = "repeated",
) -> Plan:
    """Choose loaders, window, resident and prepacked blocks for `pipeload` under `budget`.
    objective "repeated": the fastest later pass (kept blocks prepacked where that speeds their
    runs); "one-shot": the fastest first pass (each candidate also without any prepacking, whose
    slower session creation only later passes pay back)."""
    _check_objective(objective)
    n = cost.blocks
    cores = cores or default_threads()
    k_options = [loaders] if loaders else list(range(1, min(cores, MAX_LOADERS, n) + 1))
    w_options = [window] if window else list(range(1, min(n, MAX_WINDOW) + 1))
    plain = cost.with_prepack(frozenset())
    space = None if budget is None else room(budget)
    options = []
    for k in k_options:
        for w in w_options:
            for lag in (0,) if w == 1 else (1, 0):  # window 1 frees before loading anyway
                if space is not None and cost.peak((), w, lag) > space:
                    continue
                # As many blocks resident as fit unprepacked (a kept block saves its load every
                # pass), then prepack those where it speeds runs, while the budget allows.
                resident = (
                    _fill_resident(plain, space, w, lag)
                    if window is None or budget is not None
                    else ()
                )
                mixed = cost.with_prepack(_prepack_within(cost, plain, space, w, lag, resident, k))
                # one-shot: prepacking is a slower session creation, paid back only on later passes
                variants = [mixed]
                if objective == "one-shot" and any(mixed.resident_prepack):
                    variants.append(plain)
                for c in variants:
                    options.append(
                        _Option(
                            k,
                            w,
                            lag,
                            resident,
                            c,
                            c is plain,
                            steady=c.latency(k, w, resident, first_pass=False, lag=lag),
                            first=c.latency(k, w, resident, first_pass=True, lag=lag),
                            peak=c.peak(resident, w, lag, k),
                        )
                    )
    # the fastest pass of the objective; among those within PASS_TIE of it, the fastest other
    # pass, then the smallest peak

    def passes(o: _Option) -> tuple[float, float]:  # (the objective's, the other)
        return (o.steady, o.first) if objective == "repeated" else (o.first, o.steady)

    fastest = min((passes(o)[0] for o in options), default=0.0)
    best = min(
        (o for o in options if passes(o)[0] <= fastest * (1 + PASS_TIE)),
        key=lambda o: (passes(o)[1], o.peak, o.loaders, o.window, -o.lag),
        default=None,
    )
    if best is None:
        w = window or 1
        raise BudgetError(
            f"window {w} needs {format_bytes(within_margin(cost.peak((), w, 0)))}, over the budget {format_bytes(budget)}"
        )
    k, w, lag, resident, cost = best.loaders, best.window, best.lag, best.resident, best.cost
    prepacked = tuple(i for i in resident if cost.resident_prepack[i])
    return Plan(
        "pipeload",
        k,
        w,
        resident,
        prepack=False,
        readahead=True,
        drop_cache=budget is not None,
        budget_bytes=budget,
        lag=lag,
        prepack_resident=prepacked,
        no_readahead=tuple(i for i in range(n) if cost.sparse[i]),
        predicted_peak_bytes=cost.peak(resident, w, lag, k),
        predicted_latency_s=best.steady,
        predicted_first_latency_s=best.first,
        cost_source=cost.source,
        reasons=_reasons(
            cost,
            budget,
            cores,
            k,
            w,
            lag,
            resident,
            prepacked,
            loaders,
            window,
            objective,
            best.unpacked,
        ),
    )


def _reasons(
    cost, budget, cores, k, w, lag, resident, prepacked, loaders, window, objective, unpacked
) -> tuple[str, ...]:
    n = cost.blocks
    why = []
    if len(resident) == n:
        why.append(
            "no budget"
            if budget is None
            else f"the whole model ({format_bytes(cost.model_bytes)}) fits the budget"
        )
        why[-1] += ": every block stays resident after its first load"
    elif resident:
        why.append(
            f"{len(resident)} of {n} blocks stay resident between runs (most load time saved per byte); "
            f"{n - len(resident)} are streamed every run"
        )
    else:
        why.append(f"nothing fits beside the window: all {n} blocks are streamed every run")
    tuned = (
        "as asked"
        if loaders
        else f"fastest predicted {objective} pass of 1..{min(cores, MAX_LOADERS, n)} on {cores} core(s)"
    )
    why.append(f"{k} loading agent(s): {tuned}")
    why.append(
        f"window {w}: "
        + ("as asked" if window else f"fastest predicted {objective} pass that fits the budget")
    )
    if lag == 0 and len(resident) < n:
        why.append(
            "each streamed block is destroyed before the next runs: one executed block in memory, never two"
        )
    if prepacked:
        why.append(
            f"{len(prepacked)} resident block(s) prepacked: their runs are faster and they load once"
        )
    elif unpacked:  # a one-shot plan that left prepacking out
        why.append("resident blocks not prepacked: prepacking would slow the first pass")
    if cost.source == "estimate":
        why.append("costs estimated from file sizes: run `hermes-ort profile` for measured ones")
    return tuple(why)


def plan_strategy(
    strategy: str,
    cost: CostModel,
    budget: int | None,
    load_path: str = "default",
    loaders: int | None = None,
    window: int | None = None,
    objective: str = "repeated",
) -> Plan:
    """The plan of any strategy; the baselines are fixed mechanisms (DESIGN.md §1)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    if load_path not in LOAD_PATHS:
        raise ValueError(f"unknown load_path '{load_path}' (choose from {', '.join(LOAD_PATHS)})")
    _check_objective(objective)
    n = cost.blocks
    stream = load_path == "stream"
    if strategy == "pipeload":
        return plan_pipeload(cost, budget, loaders=loaders, window=window, objective=objective)
    common = dict(
        prepack=not stream,
        readahead=stream,
        drop_cache=False,
        budget_bytes=budget,
        cost_source=cost.source,
    )
    if strategy in ("full", "full-mmap"):
        return Plan(
            strategy,
            0,
            1,
            (),
            **{**common, "prepack": strategy == "full", "readahead": False},
            reasons=("one ONNX Runtime session of the whole model",),
        )
    if strategy == "pipeswitch":  # one loader, in order, overlapped with execution, everything kept
        everything = tuple(range(n))
        return Plan(
            strategy,
            loaders or 1,
            window or n,
            everything,
            **common,
            predicted_peak_bytes=cost.peak(everything, 1),
            reasons=("blocks loaded in order by one loader and all kept resident (PipeSwitch)",),
        )
    w = (
        window or 1
    )  # ondemand: load a block, run it, free it; window 2 = one block of prefetch (AirLLM)
    return Plan(
        strategy,
        loaders or 1,
        w,
        (),
        **common,
        predicted_peak_bytes=cost.peak((), w),
        reasons=(f"load, run, free each block; {w - 1} block(s) of prefetch (AirLLM)",),
    )
