"""Planning a model as `load` does it: the cost models (with and without re-reads) on one
process baseline, the page-cache policy of this machine's memory, the headroom a memory cgroup
needs for the blocks being read ahead, and the plan for a batch (its micro-batch chosen)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from hermes_ort.core.choices import Engine, LoadPath, Objective, PageCacheMode, Residency
from hermes_ort.core.errors import BudgetError
from hermes_ort.core.machine import available_memory, cgroup_memory_limit, default_threads
from hermes_ort.core.manifest import Manifest
from hermes_ort.core.units import format_bytes
from hermes_ort.measure.profiler import baseline_now, costs_now
from hermes_ort.planning.cost_model import CostModel
from hermes_ort.planning.layer_profile import Profile
from hermes_ort.planning.page_cache import (
    MemorySituation,
    PageCachePolicy,
    cgroup_headroom,
    page_cache_policy,
)
from hermes_ort.planning.pipeline_planner import MAX_LOADERS, PASS_TIE, check_budget, plan_strategy
from hermes_ort.planning.plan import BatchRun, Plan
from hermes_ort.planning.strategies import get_strategy
from hermes_ort.tensors.batch import BatchShape, micro_batches, sample_shape


@dataclass(frozen=True)
class PlanOptions:
    load_path: LoadPath = LoadPath.DEFAULT
    loaders: int | None = None
    window: int | None = None
    objective: Objective = Objective.REPEATED
    page_cache: PageCacheMode = PageCacheMode.AUTO


class ModelPlanner:
    """`plan(budget, batch)`: the plan `load` and later re-plans (a KV cache reserved, another
    batch) use; the cost models are made once per page-cache state, on one baseline."""

    def __init__(
        self,
        model_dir: Path,
        manifest: Manifest,
        strategy: str,
        profile: Profile | None,
        options: PlanOptions,
    ):
        self.model_dir = model_dir
        self.manifest = manifest
        self.strategy = strategy
        self.spec = get_strategy(strategy)
        self.profile = profile
        self.options = options
        self.baseline = baseline_now()  # one baseline: "min" of one cost model must fit the other
        available = available_memory()  # without this process's resident set, the budget's
        self.situation = MemorySituation(
            cgroup_memory_limit(), None if available is None else available + self.baseline
        )
        self.sample = sample_shape(manifest)
        self._costs: dict[bool, CostModel] = {}

    def cost_for(self, cold: bool) -> CostModel:
        """The cost model; `cold`: streamed blocks are read from storage every pass."""
        if cold not in self._costs:
            self._costs[cold] = costs_now(
                self.model_dir, self.manifest, self.profile, cold, self.baseline
            )
        return self._costs[cold]

    def policy(self, budget: int | None) -> PageCachePolicy:
        o, m = self.options, self.manifest
        return page_cache_policy(o.page_cache, budget, m.blocks_bytes, self.situation)

    def cost_under(self, budget: int | None) -> CostModel:
        return self.cost_for(self.policy(budget).drop)

    def min_budget(self) -> int:
        return self.cost_for(True).min_budget()

    def plan(self, budget: int | None, batch: BatchShape | None = None) -> Plan:
        """The plan under `budget` (None with a batch: "min" at that batch) for `batch` (None:
        the manifest's sample)."""
        if batch is None:
            policy = self.policy(budget)
            return self._plan_one(budget, self.cost_for(policy.drop), policy)
        return self._plan_batch(budget, batch)

    def _plan_one(self, budget: int | None, cost: CostModel, policy: PageCachePolicy) -> Plan:
        o, spec = self.options, self.spec
        if spec.engine == Engine.BLOCKS:
            check_budget(cost, budget, tuple(b.name for b in self.manifest.blocks))
        planned_here = spec.residency == Residency.PLANNED
        largest = max(b.bytes for b in self.manifest.blocks)
        in_flight = min(o.loaders or default_threads(), MAX_LOADERS) * largest
        planned, note = cgroup_headroom(
            budget, self.situation.cgroup_limit_bytes, in_flight, cost.min_budget()
        )
        return plan_strategy(
            self.strategy,
            cost,
            budget,
            load_path=o.load_path,
            loaders=o.loaders,
            window=o.window,
            objective=o.objective,
            manifest=self.manifest,
            page_cache=policy,
            headroom=(planned, note) if note and planned_here else None,
        )

    def _plan_batch(self, budget: int | None, batch: BatchShape) -> Plan:
        """Each candidate micro-batch (the whole batch, then halves) planned; the largest
        predicted as fast as the fastest wins (fewer, larger runs)."""
        scale = batch.scale(self.sample)

        def micro_scale(rows: int) -> float:
            return batch.with_rows(rows).scale(self.sample)

        if budget is None:  # "min": the least memory this batch runs in, one row at a time
            budget = self.cost_for(True).at_batch(scale, micro_scale(1)).min_budget()
        policy = self.policy(budget)
        base = self.cost_for(policy.drop)
        found: list[tuple[int, Plan]] = []
        error: BudgetError | None = None
        planned_here = self.spec.residency == Residency.PLANNED
        for m in micro_batches(batch.rows) if planned_here else [batch.rows]:
            try:
                found.append(
                    (m, self._plan_one(budget, base.at_batch(scale, micro_scale(m)), policy))
                )
            except BudgetError as e:
                error = e
        if not found:
            raise BudgetError(f"a batch of {batch.rows} x {batch.positions} positions: {error}")
        fastest = min(p.prediction.latency_s or 0.0 for _, p in found)
        m, plan = next(
            (m, p) for m, p in found if (p.prediction.latency_s or 0.0) <= fastest * (1 + PASS_TIE)
        )
        between = format_bytes(base.at_batch(scale, 1.0).inflight_bytes)
        how = "at once" if m == batch.rows else f"{m} row{'s' if m != 1 else ''} at a time"
        reason = (
            f"batch {batch.rows} x {batch.positions}: each block runs over the whole batch, "
            f"{how}; its {between} of tensors between blocks counted in the budget"
        )
        return replace(
            plan,
            batch=BatchRun(batch.rows, batch.positions, m if m < batch.rows else None),
            reasons=(*plan.reasons, reason),
        )
