"""The pipeline planner: how many loading agents, how large a window, which blocks stay resident
and which are prepacked, under a memory budget; and the fixed plans of the baselines.

`plan_pipeload` searches loaders x window, fills the rest of the budget with resident blocks (most
time saved per byte first), and keeps the plan with the lowest predicted latency of the objective's
pass: a repeated pass (default) or the first (one-shot); plans within 3% of it are a tie, won by the
faster other pass (then the lowest peak). Costs come from the cost model (cost_model.py); what each
strategy is, from strategies.py."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hermes_ort.core.choices import Engine, LoadPath, Objective, Residency, StrategyName, values
from hermes_ort.core.errors import BudgetError, OptionError
from hermes_ort.core.machine import default_threads
from hermes_ort.core.manifest import Manifest
from hermes_ort.core.settings import PREPACKED_STREAMING, STREAMING
from hermes_ort.core.units import format_bytes
from hermes_ort.planning.cost_model import CostModel, room, within_margin
from hermes_ort.planning.page_cache import PageCachePolicy
from hermes_ort.planning.plan import BlockMechanism, Mechanism, Plan, Prediction
from hermes_ort.planning.strategies import block_loading, get_strategy, whole_model_file

MAX_LOADERS = 4  # more agents than cores only contend for them (docs/design.md §2.2)
MAX_WINDOW = 8
PASS_TIE = 0.03  # plans whose objective's pass is predicted this close are a tie
OBJECTIVES = values(Objective)  # what the plan makes fastest: later passes, or the first


def check_budget(cost: CostModel, budget: int | None, block_names: tuple[str, ...]) -> None:
    """Refuse a budget that cannot hold the largest block plus its activations, naming both."""
    if budget is None:
        return
    need = cost.min_budget()
    if need > budget:
        largest = max(range(cost.count), key=lambda i: cost.blocks[i].live_bytes)
        raise BudgetError(
            f"memory budget {format_bytes(budget)} cannot hold block '{block_names[largest]}' "
            f"({format_bytes(cost.blocks[largest].live_bytes)} resident when run) plus the process "
            "baseline "
            f"({format_bytes(cost.baseline_bytes)}) and activations "
            f"({format_bytes(cost.activation_bytes)}); "
            f"the smallest workable budget is {format_bytes(need)} ({need} bytes)"
        )


def _fill_resident(cost: CostModel, budget: int | None, window: int, lag: int) -> tuple[int, ...]:
    """Blocks to keep, most time saved per byte first, while the peak stays within the budget."""
    everything = tuple(range(cost.count))
    if budget is None or cost.peak(everything, window, lag) <= budget:
        return everything

    def saved_per_byte(i: int) -> float:
        b = cost.blocks[i]
        s, r = b.stream_times, b.resident_times
        return (s.load_s + s.first_run_s - r.steady_run_s) / max(1, b.resident_bytes)

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
    candidates = [i for i in resident if cost.blocks[i].resident_prepack]
    if budget is None:
        return frozenset(candidates)

    def gain(i: int) -> float:
        b = cost.blocks[i]
        saved = plain.blocks[i].resident_times.steady_run_s - b.resident_times.steady_run_s
        return saved / max(1, b.resident_bytes - b.live_bytes)

    chosen: frozenset[int] = frozenset()
    for i in sorted(candidates, key=gain, reverse=True):
        trial = chosen | {i}
        if cost.with_prepack(trial).peak(resident, window, lag, loaders) <= budget:
            chosen = trial
    return chosen


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


def _options(cost, budget, k_options, w_options, fill, objective) -> list[_Option]:
    """Every candidate: each (loaders, window, lag) that fits, its resident and prepacked blocks."""
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
                resident = _fill_resident(plain, space, w, lag) if fill else ()
                mixed = cost.with_prepack(_prepack_within(cost, plain, space, w, lag, resident, k))
                # one-shot: prepacking is a slower session creation, paid back only on later passes
                variants = [mixed]
                if objective == Objective.ONE_SHOT and any(
                    b.resident_prepack for b in mixed.blocks
                ):
                    variants.append(plain)
                for c in variants:
                    steady = c.latency(k, w, resident, first_pass=False, lag=lag)
                    first = c.latency(k, w, resident, first_pass=True, lag=lag)
                    peak = c.peak(resident, w, lag, k)
                    options.append(_Option(k, w, lag, resident, c, c is plain, steady, first, peak))
    return options


def plan_pipeload(
    cost: CostModel,
    budget: int | None,
    cores: int = 0,
    loaders: int | None = None,
    window: int | None = None,
    objective: Objective = Objective.REPEATED,
    page_cache: PageCachePolicy | None = None,
    headroom: tuple[int | None, str] | None = None,
) -> Plan:
    """Choose loaders, window, resident and prepacked blocks for `pipeload` under `budget`.
    headroom: (the budget the blocks are searched in, why) where that is below `budget` (a
    memory cgroup charged with the page cache being read ahead: page_cache.cgroup_headroom).
    objective "repeated": the fastest later pass (kept blocks prepacked where that speeds their
    runs); "one-shot": the fastest first pass (each candidate also without any prepacking, whose
    slower session creation only later passes pay back)."""
    objective = Objective(objective)
    n = cost.count
    cores = cores or default_threads()
    k_options = [loaders] if loaders else list(range(1, min(cores, MAX_LOADERS, n) + 1))
    w_options = [window] if window else list(range(1, min(n, MAX_WINDOW) + 1))
    fill = window is None or budget is not None  # a fixed window without a budget keeps nothing
    search, note = headroom or (budget, "")
    options = _options(cost, search, k_options, w_options, fill, objective)

    def passes(o: _Option) -> tuple[float, float]:  # (the objective's, the other)
        return (o.steady, o.first) if objective == Objective.REPEATED else (o.first, o.steady)

    # the fastest pass of the objective; among those within PASS_TIE of it, the fastest other
    # pass, then the smallest peak
    fastest = min((passes(o)[0] for o in options), default=0.0)
    best = min(
        (o for o in options if passes(o)[0] <= fastest * (1 + PASS_TIE)),
        key=lambda o: (passes(o)[1], o.peak, o.loaders, o.window, -o.lag),
        default=None,
    )
    if best is None:
        w = window or 1
        need = format_bytes(within_margin(cost.peak((), w, 0)))
        raise BudgetError(f"window {w} needs {need}, over the budget {format_bytes(search)}")
    kept = set(best.resident)
    packed = {i for i in kept if best.cost.blocks[i].resident_prepack}
    if page_cache is None:  # the policy of a budget where memory is short (page_cache.py)
        page_cache = PageCachePolicy(budget is not None, "")
    drop = page_cache.drop
    streamed_packed = [b.stream_prepack for b in best.cost.blocks]
    blocks = tuple(
        BlockMechanism(
            resident=i in kept,
            settings=PREPACKED_STREAMING
            if (i in packed if i in kept else streamed_packed[i])
            else STREAMING,
            readahead=not best.cost.blocks[i].sparse,  # sparse: pages fault in on demand
            drop_pages=drop and (i in packed if i in kept else not best.cost.blocks[i].sparse),
        )
        for i in range(n)
    )
    return Plan(
        strategy=StrategyName.PIPELOAD,
        mechanism=Mechanism(
            Engine.BLOCKS, loaders=best.loaders, window=best.window, blocks=blocks, lag=best.lag
        ),
        budget_bytes=budget,
        prediction=Prediction(best.peak, best.steady, best.first, best.cost.source),
        reasons=_reasons(best, budget, cores, len(packed), loaders, window, objective)
        + ((page_cache.reason,) if page_cache.reason and len(kept) < n else ())
        + ((note,) if note else ()),
    )


def _reasons(
    best: _Option, budget, cores, prepacked, loaders, window, objective
) -> tuple[str, ...]:
    cost, resident, n = best.cost, best.resident, best.cost.count
    why = []
    if len(resident) == n:
        fits = f"the whole model ({format_bytes(cost.model_bytes)}) fits the budget"
        why.append(("no budget" if budget is None else fits) + ": every block stays resident")
    elif resident:
        why.append(
            f"{len(resident)} of {n} blocks stay resident between runs (most load time saved "
            f"per byte); {n - len(resident)} are streamed every run"
        )
    else:
        why.append(f"nothing fits beside the window: all {n} blocks are streamed every run")
    span = min(cores, MAX_LOADERS, n)
    tuned = "as asked" if loaders else f"fastest predicted {objective} pass of 1..{span}"
    why.append(f"{best.loaders} loading agent(s): {tuned} on {cores} core(s)")
    fitted = f"fastest predicted {objective} pass that fits the budget"
    why.append(f"window {best.window}: " + ("as asked" if window else fitted))
    if best.lag == 0 and len(resident) < n:
        why.append(
            "each streamed block is destroyed before the next runs: "
            "one executed block in memory, never two"
        )
    if prepacked:
        why.append(f"{prepacked} resident block(s) prepacked: faster runs, loaded once")
    elif best.unpacked:  # a one-shot plan that left prepacking out
        why.append("resident blocks not prepacked: prepacking would slow the first pass")
    if cost.source == "estimate":
        why.append("costs estimated from file sizes: run `hermes-ort profile` for measured ones")
    return tuple(why)


def plan_strategy(
    strategy: StrategyName,
    cost: CostModel,
    budget: int | None,
    load_path: LoadPath = LoadPath.DEFAULT,
    loaders: int | None = None,
    window: int | None = None,
    objective: Objective = Objective.REPEATED,
    manifest: Manifest | None = None,
    page_cache: PageCachePolicy | None = None,
    headroom: tuple[int | None, str] | None = None,
) -> Plan:
    """The plan of any strategy (strategies.py): pipeload's from the search above, the baselines'
    fixed. The whole-model strategies need the manifest (the file they open)."""
    spec = get_strategy(strategy)
    settings, readahead = block_loading(load_path)
    n = cost.count
    if spec.residency == Residency.PLANNED:
        return plan_pipeload(
            cost,
            budget,
            loaders=loaders,
            window=window,
            objective=objective,
            page_cache=page_cache,
            headroom=headroom,
        )
    report = dict(strategy=spec.name, budget_bytes=budget, reasons=(spec.about,))
    if spec.engine == Engine.WHOLE:
        if manifest is None:
            raise OptionError(f"strategy '{strategy}' is planned with the model's manifest")
        whole = whole_model_file(manifest, spec)
        whole_settings = spec.whole_settings
        if manifest.packed_weights:  # mapped, MatMulNBits would dequantize on every run
            whole_settings = replace(whole_settings, prepack=True)
        mechanism = Mechanism(Engine.WHOLE, whole=whole, whole_settings=whole_settings)
        return Plan(mechanism=mechanism, prediction=Prediction(cost_source=cost.source), **report)
    keep = spec.residency == Residency.ALL
    packed = [b.stream_prepack for b in cost.blocks]  # MatMulNBits blocks open prepacked, always
    blocks = tuple(
        BlockMechanism(keep, replace(settings, prepack=True) if pk else settings, readahead)
        for pk in packed
    )
    # pipeswitch keeps everything (its window never binds); ondemand: window 2 = one block of
    # prefetch, as AirLLM's
    w = window or (n if keep else 1)
    resident = tuple(range(n)) if keep else ()
    peak = cost.peak(resident, 1 if keep else w)
    mechanism = Mechanism(Engine.BLOCKS, loaders=loaders or 1, window=w, blocks=blocks)
    return Plan(mechanism=mechanism, prediction=Prediction(peak, cost_source=cost.source), **report)
