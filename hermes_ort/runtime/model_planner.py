"""Planning a model as `load` does it: the cost models (with and without re-reads) on one
process baseline, the page-cache policy of this machine's memory, whether blocks may be paged
(asked, and a packed-copy cache to save them in), the headroom a memory cgroup needs for the
blocks being read ahead, and the plan for a batch (its micro-batch chosen)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from hermes_ort.core.choices import Engine, LoadPath, Objective, PageCacheMode, Paging, Residency
from hermes_ort.core.errors import BudgetError
from hermes_ort.core.machine import available_memory, cgroup_memory_limit, default_threads
from hermes_ort.core.manifest import Manifest
from hermes_ort.core.units import format_bytes
from hermes_ort.measure.profiler import baseline_now, costs_now
from hermes_ort.planning.activation_model import PassShape
from hermes_ort.planning.cost_model import CostModel
from hermes_ort.planning.layer_profile import Profile
from hermes_ort.planning.page_cache import (
    MemorySituation,
    PageCachePolicy,
    cgroup_headroom,
    page_cache_policy,
)
from hermes_ort.planning.paging import PagingPolicy, paging_policy
from hermes_ort.planning.pipeline_planner import MAX_LOADERS, PASS_TIE, check_budget, plan_strategy
from hermes_ort.planning.plan import BatchRun, Plan
from hermes_ort.planning.strategies import get_strategy
from hermes_ort.streaming.paged import paging_problem
from hermes_ort.tensors.batch import BatchShape, micro_batches, sample_shape
from hermes_ort.tensors.kv_cache import decoder_signature
from hermes_ort.tensors.prefill import supports_chunked_prefill

MIN_PREFILL_CHUNK = 16  # positions: below this a chunk saves little memory and costs a pass


@dataclass(frozen=True)
class PlanOptions:
    load_path: LoadPath = LoadPath.DEFAULT
    loaders: int | None = None
    window: int | None = None
    objective: Objective = Objective.REPEATED
    page_cache: PageCacheMode = PageCacheMode.AUTO
    paging: Paging = Paging.AUTO


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
        self.decoder = decoder_signature(manifest) is not None
        self._chunking: dict[int, bool] = {}  # rows -> the graph takes a prompt in chunks
        self._costs: dict[bool, CostModel] = {}
        self.paging = self._paging_policy()

    def _paging_policy(self) -> PagingPolicy:
        """Paging as asked, where the cache can hold saved copies (looked at only for a model
        whose blocks run prepacked: MatMulNBits)."""
        mode = self.options.paging
        asked = mode != Paging.OFF and self.manifest.packed_weights
        return paging_policy(mode, paging_problem() if asked else None)

    def cost_for(self, cold: bool) -> CostModel:
        """The cost model; `cold`: streamed blocks are read from storage every pass."""
        if cold not in self._costs:
            cost = costs_now(self.model_dir, self.manifest, self.profile, cold, self.baseline)
            self._costs[cold] = cost if self.paging.allowed else cost.without_paging()
        return self._costs[cold]

    def policy(self, budget: int | None) -> PageCachePolicy:
        o, m = self.options, self.manifest
        return page_cache_policy(o.page_cache, budget, m.blocks_bytes, self.situation)

    def cost_under(self, budget: int | None) -> CostModel:
        return self.cost_for(self.policy(budget).drop)

    def min_budget(self) -> int:
        return self.cost_for(True).min_budget()

    def plan(
        self, budget: int | None, batch: BatchShape | None = None, generation: bool = False
    ) -> Plan:
        """The plan under `budget` (None with a batch: "min" at that batch) for `batch` (None:
        the manifest's sample). `generation`: a decoder's prefill, which needs the last
        position's logits only and may run in chunks of positions."""
        if batch is None:
            policy = self.policy(budget)
            return self._plan_one(budget, self.cost_for(policy.drop), policy)
        return self._plan_batch(budget, batch, generation)

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
            paging=self.paging,
        )

    def chunking(self, rows: int) -> bool:
        """Whether this decoder's graph takes a prompt of `rows` in chunks (tensors/prefill.py)."""
        if not self.decoder:
            return False
        if rows not in self._chunking:
            self._chunking[rows] = supports_chunked_prefill(self.model_dir, self.manifest, rows)
        return self._chunking[rows]

    def _candidates(self, batch: BatchShape, generation: bool) -> list[PassShape]:
        """Ways to run the batch: each micro-batch (the whole batch, then halves) and, for a
        decoder's prefill, each prefill chunk (the whole prompt, then halves down to
        MIN_PREFILL_CHUNK); largest first."""
        chunks = [batch.positions]
        if generation and self.chunking(batch.rows):
            while chunks[-1] > MIN_PREFILL_CHUNK:
                chunks.append(max(MIN_PREFILL_CHUNK, (chunks[-1] + 1) // 2))
        last = 1 if generation and self.decoder else None
        return [
            PassShape(batch.rows, c, m if m < batch.rows else None, batch.positions, last)
            for c in chunks
            for m in micro_batches(batch.rows)
        ]

    def smallest_for(self, batch: BatchShape, generation: bool = False) -> int:
        """The smallest budget that runs `batch`: one row of the smallest chunk at a time."""
        shapes = self._candidates(batch, generation)
        if self.spec.residency != Residency.PLANNED:
            shapes = [s for s in shapes if s.micro_rows is None and s.positions == batch.positions]
        return min(self.cost_for(True).at_pass(s).min_budget() for s in shapes)

    def _plan_batch(self, budget: int | None, batch: BatchShape, generation: bool) -> Plan:
        """Each candidate way to run the batch planned; the fastest whole batch (a chunked
        prefill streams every block once per chunk) wins, the fewest, largest runs among those
        within PASS_TIE of it."""
        if budget is None:  # "min": the least memory this batch runs in
            budget = self.smallest_for(batch, generation)
        policy = self.policy(budget)
        base = self.cost_for(policy.drop)
        found: list[tuple[PassShape, float, Plan]] = []
        error: BudgetError | None = None
        planned_here = self.spec.residency == Residency.PLANNED
        for shape in self._candidates(batch, generation):
            if not planned_here and (shape.micro_rows or shape.positions < batch.positions):
                continue
            try:
                plan = self._plan_one(budget, base.at_pass(shape), policy)
            except BudgetError as e:
                error = error or e
                continue
            passes = -(-batch.positions // shape.positions)
            found.append((shape, passes * (plan.prediction.latency_s or 0.0), plan))
        if not found:
            smallest = self.smallest_for(batch, generation)
            need = f"{format_bytes(smallest)} ({smallest} bytes)"  # exact, for scripts
            unit = (
                "one prefill chunk of one row"
                if generation and self.chunking(batch.rows)
                else "one row"
            )
            raise BudgetError(
                f"a batch of {batch.rows} x {batch.positions} positions needs at least {need} "
                f"({unit} at a time), over the budget {format_bytes(budget)}"
            )
        fastest = min(t for _, t, _ in found)
        shape, _, plan = next(x for x in found if x[1] <= fastest * (1 + PASS_TIE))
        return replace(
            plan,
            batch=BatchRun(
                batch.rows,
                batch.positions,
                shape.micro_rows,
                shape.positions if shape.positions < batch.positions else None,
            ),
            reasons=(*plan.reasons, self._batch_reason(batch, shape, base, generation)),
        )

    def _batch_reason(
        self, batch: BatchShape, shape: PassShape, base: CostModel, generation: bool
    ) -> str:
        at = base.at_pass(shape)
        m = shape.run_rows
        how = "at once" if m == batch.rows else f"{m} row{'s' if m != 1 else ''} at a time"
        chunked = ""
        if shape.positions < batch.positions:
            passes = -(-batch.positions // shape.positions)
            chunked = f"; the prompt prefilled {shape.positions} positions a pass ({passes} passes)"
        logits = "; logits of the last position only" if shape.logit_positions == 1 else ""
        fits = "the largest that fits the budget" if (m < batch.rows or chunked) else "it fits"
        return (
            f"batch {batch.rows} x {batch.positions}: each block runs over the whole batch, {how}"
            f"{chunked} ({fits}){logits}; activations {format_bytes(at.activation_bytes)} "
            f"counted, of which {format_bytes(at.inflight_bytes)} tensors between blocks"
        )
