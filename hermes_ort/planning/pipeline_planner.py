"""The pipeline planner: how many loading agents, how large a window, which blocks stay resident,
which are paged and which are prepacked, under a memory budget; and the fixed plans of the
baselines.

`plan_pipeload` searches loaders x window and, for each, which prepacked streamed blocks to page
(their sessions kept open on saved packed copies: paging.py) and which blocks to keep resident
(most load time saved per byte first): nothing paged; the same kept blocks and the others paged
where they fit; or the most paged first and blocks kept beside them (`_paging_variants`). It
keeps the plan with the lowest predicted latency of the objective's pass: a repeated pass
(default) or the first (one-shot, which pays the paged blocks' opening). Plans within 3% of the
fastest are a tie, won by the faster other pass (then the lowest peak). Costs come from the cost
model (cost_model.py); what each strategy is, from strategies.py."""

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
from hermes_ort.planning.paging import PagingPolicy
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
    cost: CostModel  # with the chosen blocks paged and prepacked
    unpacked: bool  # prepacking left out for the first pass's sake
    steady: float
    first: float
    peak: int
    unpaged: bool = False  # paging left out though some fitted (its opening slows a first pass)


def _paging_variants(
    cost: CostModel, space: int | None, w: int, lag: int, fill: bool
) -> list[tuple[frozenset[int], tuple[int, ...], bool]]:
    """(blocks paged, blocks kept, paging left out though some fit) to try at (window, lag):
    - nothing paged, as many blocks kept as fit (most load time saved per byte first);
    - the same blocks kept, and the most of the others that fit paged;
    - the most that fit paged first (every block that pages faster, or all but those whose
      opening holds the most), then as many blocks kept as fit beside them.
    Kept blocks are chosen unprepacked (prepacking comes after, in `_shaped`)."""
    plain = cost.with_prepack(frozenset())
    choices = [s for s in cost.paging_choices() if s]

    def fits(paged: frozenset[int], resident: tuple[int, ...] = ()) -> bool:
        return space is None or plain.with_paged(paged).peak(resident, w, lag) <= space

    def kept(paged: frozenset[int]) -> tuple[int, ...]:
        return _fill_resident(plain.with_paged(paged), space, w, lag) if fill else ()

    variants: list[tuple[frozenset[int], tuple[int, ...], bool]] = []
    first = next((s for s in choices if fits(s)), None)
    if first is not None:
        variants.append((first, kept(first), False))
    if fits(frozenset()):
        resident = kept(frozenset())
        rest = (s - set(resident) for s in choices)
        beside = next((s for s in rest if s and fits(s, resident)), None)
        if beside is not None:
            variants.append((beside, resident, False))
        variants.append((frozenset(), resident, bool(variants)))
    return variants


def _options(cost, budget, k_options, w_options, fill, objective) -> list[_Option]:
    """Every candidate: each (loaders, window, lag) that fits, with its paged, resident and
    prepacked blocks (`_paging_variants`)."""
    space = None if budget is None else room(budget)
    options = []
    for w in w_options:
        for lag in (0,) if w == 1 else (1, 0):  # window 1 frees before loading anyway
            for paged, resident, left_out in _paging_variants(cost, space, w, lag, fill):
                c = cost.with_paged(paged)
                for k in k_options:
                    options += _shaped(c, space, k, w, lag, resident, objective, left_out)
    return options


def _shaped(c: CostModel, space, k, w, lag, resident, objective, left_out: bool) -> list[_Option]:
    """One (loaders, window, lag, paged and kept blocks): the kept blocks prepacked where it
    speeds runs, while the budget allows; for one-shot, also without prepacking (a slower
    creation, paid back only on later passes)."""
    plain = c.with_prepack(frozenset())
    mixed = c.with_prepack(_prepack_within(c, plain, space, w, lag, resident, k))
    variants = [mixed]
    if objective == Objective.ONE_SHOT and any(b.resident_prepack for b in mixed.blocks):
        variants.append(plain)
    options = []
    for v in variants:
        steady = v.latency(k, w, resident, first_pass=False, lag=lag)
        first = v.latency(k, w, resident, first_pass=True, lag=lag)
        peak = v.peak(resident, w, lag, k)
        options.append(
            _Option(k, w, lag, resident, v, v is plain, steady, first, peak, unpaged=left_out)
        )
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
    paging: PagingPolicy | None = None,
) -> Plan:
    """Choose loaders, window, resident, paged and prepacked blocks for `pipeload` under
    `budget`. headroom: (the budget the blocks are searched in, why) where that is below
    `budget` (a memory cgroup charged with the page cache being read ahead:
    page_cache.cgroup_headroom). objective "repeated": the fastest later pass (kept blocks
    prepacked where that speeds their runs); "one-shot": the fastest first pass (each candidate
    also without any prepacking, whose slower session creation only later passes pay back).
    paging: whether prepacked streamed blocks may be paged (None: where the costs can)."""
    objective = Objective(objective)
    if paging is not None and not paging.allowed:
        cost = cost.without_paging()
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
    paged = best.cost.paged - kept
    blocks = tuple(
        BlockMechanism(
            resident=i in kept,
            settings=PREPACKED_STREAMING
            if (i in packed if i in kept else streamed_packed[i])
            else STREAMING,
            readahead=not best.cost.blocks[i].sparse,  # sparse: pages fault in on demand
            drop_pages=drop and (i in packed if i in kept else not best.cost.blocks[i].sparse),
            paged=i in paged,
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
        + _paging_reasons(best, paging)
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


def _paging_reasons(best: _Option, paging: PagingPolicy | None) -> tuple[str, ...]:
    """What the plan pages, and why the prepacked streamed blocks it does not page are not."""
    cost, kept = best.cost, set(best.resident)
    streamed = [(i, b) for i, b in enumerate(cost.blocks) if i not in kept]
    paged = [b for _, b in streamed if b.paged]
    recreated = [b for _, b in streamed if b.stream_prepack and not b.paged]
    why = []
    if paged:
        why.append(
            f"{len(paged)} block(s) paged: sessions kept open on saved packed copies (opened "
            f"once, before the first pass; {format_bytes(sum(b.paging.anon_bytes for b in paged))} "
            "kept between runs), pages dropped after each run and prefetched before the next"
        )
    if not recreated:
        return tuple(why)
    head = f"{len(recreated)} prepacked block(s) re-created every pass"
    if paging is not None and not paging.allowed:
        why.append(paging.reason)
    elif best.unpaged:
        opening = sum(b.paging.open_s for b in recreated if b.paging)
        why.append(f"{head}: paging them would slow the first pass (opening them: {_ms(opening)})")
    elif any(b.paging for b in recreated):
        hold = max(b.paging.open_bytes for b in recreated if b.paging)
        why.append(
            f"{head}: paging them does not fit the budget (each keeps its session's own "
            f"structures, and opening one holds up to {format_bytes(hold)} once)"
        )
    else:
        why.append(f"{head}: no packed copy of theirs could be measured")
    return tuple(why)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


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
    paging: PagingPolicy | None = None,
) -> Plan:
    """The plan of any strategy (strategies.py): pipeload's from the search above, the baselines'
    fixed (they page nothing). The whole-model strategies need the manifest (the file they
    open)."""
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
            paging=paging,
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
