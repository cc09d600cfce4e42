"""Splitting a model over boards: the block list cut into contiguous stages, one per board, each
fitting its board's budget (all resident where it fits, else streamed within the stage by the
single-board planner), the slowest stage as fast as possible. Arithmetic only: the boards are
data (cluster/connect.py measures them on the cluster), the costs are the single-board cost
model's.

A stage's time is its predicted repeated pass; a request's latency is the sum of the stages plus
the hops between boards; with several requests in flight the slowest stage sets the throughput."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

from hermes_ort.cluster.stage_spec import allowed_cuts, stage_manifest, stage_profile, stage_spec
from hermes_ort.core.errors import BudgetError, OptionError
from hermes_ort.core.manifest import Manifest
from hermes_ort.core.units import format_bytes
from hermes_ort.planning.cost_model import CostModel, room
from hermes_ort.planning.layer_profile import Profile
from hermes_ort.planning.pipeline_planner import plan_pipeload

TIE = 0.02  # splits whose slowest stages are within this share: the smaller sum wins
MAX_ORDERED = 4  # up to this many boards every order of them is tried (heterogeneous budgets)


@dataclass(frozen=True)
class Board:
    """One node of the cluster as the split sees it. `budget_bytes`: what the stage's process
    may hold (its RSS: the Ray worker's own baseline included), i.e. the board's budget minus
    Ray's other processes there (`ray_bytes`: raylet, agents, idle workers; on the head the GCS
    too). `baseline_bytes`: the stage process's RSS before any block is opened."""

    name: str
    node_id: str
    budget_bytes: int
    ray_bytes: int
    baseline_bytes: int
    cpus: int
    given: str = "reported free"  # how the budget was set: "given" or "reported free"


@dataclass(frozen=True)
class Stage:
    index: int
    board: Board
    first: int  # its first block
    last: int  # one past its last block
    resident: int  # of its blocks, kept resident (the rest streamed within the stage)
    predicted_s: float  # a repeated pass of its blocks
    predicted_peak_bytes: int

    @property
    def blocks(self) -> int:
        return self.last - self.first


@dataclass(frozen=True)
class StagePlan:
    stages: tuple[Stage, ...]
    block_names: tuple[str, ...]

    @property
    def cuts(self) -> tuple[int, ...]:
        return tuple(s.first for s in self.stages[1:])

    @property
    def slowest_s(self) -> float:
        return max(s.predicted_s for s in self.stages)

    @property
    def sum_s(self) -> float:
        return sum(s.predicted_s for s in self.stages)

    def describe(self) -> str:
        names = self.block_names
        lines = [
            f"{len(self.stages)} stage(s): a pass {self.sum_s * 1000:.0f} ms of compute plus "
            f"{len(self.stages) - 1} hop(s); with requests in flight, one every "
            f"{self.slowest_s * 1000:.0f} ms (the slowest stage)"
        ]
        for s in self.stages:
            b = s.board
            how = (
                "all resident"
                if s.resident == s.blocks
                else f"{s.resident} resident, rest streamed"
            )
            span = names[s.first] + (f"..{names[s.last - 1]}" if s.blocks > 1 else "")
            peak, budget = format_bytes(s.predicted_peak_bytes), format_bytes(b.budget_bytes)
            lines.append(
                f"- stage {s.index} on board '{b.name}': blocks {span} ({s.blocks}, {how}), "
                f"predicted {s.predicted_s * 1000:.0f} ms, peak {peak} of its budget {budget} "
                f"({b.given}; Ray's own processes there: {format_bytes(b.ray_bytes)})"
            )
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "cuts": list(self.cuts),
            "predicted_pass_s": self.sum_s,
            "predicted_slowest_stage_s": self.slowest_s,
            "stages": [
                {
                    "index": s.index,
                    "board": s.board.name,
                    "node_id": s.board.node_id,
                    "first_block": self.block_names[s.first],
                    "last_block": self.block_names[s.last - 1],
                    "blocks": s.blocks,
                    "resident": s.resident,
                    "budget_bytes": s.board.budget_bytes,
                    "budget_from": s.board.given,
                    "ray_bytes": s.board.ray_bytes,
                    "baseline_bytes": s.board.baseline_bytes,
                    "predicted_s": s.predicted_s,
                    "predicted_peak_bytes": s.predicted_peak_bytes,
                }
                for s in self.stages
            ],
        }


class _Costs:
    """Per (first, last, board): the stage's predicted (time, resident blocks, peak), or None
    where its blocks cannot run in the board's budget; memoised (the split asks O(n^2) each)."""

    def __init__(self, manifest: Manifest, profiles: dict[str, Profile | None]):
        self.manifest = manifest
        self.profiles = profiles  # node id -> the profile that board sees (None: estimates)
        self.memo: dict[tuple[int, int, str], tuple[float, int, int] | None] = {}

    def __call__(self, first: int, last: int, board: Board) -> tuple[float, int, int] | None:
        key = (first, last, board.node_id)
        if key not in self.memo:
            self.memo[key] = self._cost(first, last, board)
        return self.memo[key]

    def _cost(self, first: int, last: int, board: Board) -> tuple[float, int, int] | None:
        spec = stage_spec(self.manifest, 0, first, last)
        sub = stage_manifest(self.manifest, spec)
        profile = stage_profile(self.profiles.get(board.node_id), spec)
        if profile is None:
            cost = CostModel.estimate(sub, board.baseline_bytes, warmup_pending=True)
        else:  # streamed blocks re-read each pass: a board that streams has no room to cache
            cost = CostModel.from_profile(sub, profile, board.baseline_bytes, True, None, True)
        everything = tuple(range(cost.count))
        peak = cost.peak(everything, 1, 0)
        if peak <= room(board.budget_bytes):
            return cost.latency(1, 1, everything, False, 0), len(everything), peak
        try:
            plan = plan_pipeload(cost, board.budget_bytes)
        except BudgetError:
            return None
        return plan.prediction.latency_s or 0.0, len(plan.resident), plan.prediction.peak_bytes or 0


def split_blocks(
    manifest: Manifest,
    profiles: dict[str, Profile | None] | Profile | None,
    boards: tuple[Board, ...],
) -> StagePlan:
    """The split over `boards` (each gets at least one block; with up to MAX_ORDERED boards,
    every order of them is tried) whose slowest stage is fastest, ties to the smaller sum;
    BudgetError naming the boards and what they lack when no split fits. `profiles`: per node
    id, the layer profile that board matches (a profile is keyed by machine and cores), or one
    profile (or None: estimates from file sizes) for every board."""
    n = len(manifest.blocks)
    if not boards:
        raise OptionError("no boards to place the model on")
    if len(boards) > n:
        raise OptionError(
            f"{len(boards)} boards for {n} blocks: name at most {n} boards (every stage holds "
            f"at least one block)"
        )
    if not isinstance(profiles, dict):
        profiles = {b.node_id: profiles for b in boards}
    costs = _Costs(manifest, profiles)
    allowed = allowed_cuts(manifest)
    if len(allowed) < len(boards) - 1:
        raise OptionError(
            f"{len(boards)} boards for a model that can be cut at {len(allowed)} place(s) "
            f"(a stage holds whole KV cache slots): name at most {len(allowed) + 1} boards"
        )
    orders = permutations(boards) if len(boards) <= MAX_ORDERED else [boards]
    best: tuple[float, float, tuple[Stage, ...]] | None = None
    for order in orders:
        found = _best_for_order(order, n, costs, allowed)
        if found is not None and (best is None or _better(found, best)):
            best = found
    if best is None:
        raise BudgetError(_no_split(manifest, boards, costs))
    return StagePlan(best[2], tuple(b.name for b in manifest.blocks))


def _better(a: tuple, b: tuple) -> bool:
    if a[0] < b[0] * (1 - TIE):
        return True
    return a[0] <= b[0] * (1 + TIE) and a[1] < b[1]


def _best_for_order(order: tuple[Board, ...], n: int, costs: _Costs, allowed: frozenset[int]):
    """Dynamic programme over (boards used, blocks covered): (slowest, sum, stages) so far,
    compared exactly (the tie rule is for the final candidates only: it does not compound)."""
    k = len(order)
    table: dict[tuple[int, int], tuple[float, float, tuple[Stage, ...]]] = {(0, 0): (0.0, 0.0, ())}
    for j, board in enumerate(order):
        for covered in range(j, n - (k - j) + 1):
            done = table.get((j, covered))
            if done is None:
                continue
            last_options = [n] if j == k - 1 else range(covered + 1, n - (k - j - 1) + 1)
            for last in last_options:
                if last < n and last not in allowed:
                    continue
                c = costs(covered, last, board)
                if c is None:
                    continue
                t, resident, peak = c
                stage = Stage(j, board, covered, last, resident, t, peak)
                cand = (max(done[0], t), done[1] + t, (*done[2], stage))
                old = table.get((j + 1, last))
                if old is None or cand[:2] < old[:2]:
                    table[(j + 1, last)] = cand
    return table.get((k, n))


def _no_split(manifest: Manifest, boards: tuple[Board, ...], costs: _Costs) -> str:
    """Why nothing fits: the largest block against the largest board, and the total."""
    largest = max(boards, key=lambda b: b.budget_bytes)
    singles = [costs(i, i + 1, largest) for i in range(len(manifest.blocks))]
    too_big = [manifest.blocks[i].name for i, c in enumerate(singles) if c is None]
    budgets = ", ".join(f"'{b.name}' {format_bytes(b.budget_bytes)}" for b in boards)
    if too_big:
        return (
            f"block '{too_big[0]}' does not run alone in the largest board's budget "
            f"('{largest.name}': {format_bytes(largest.budget_bytes)} after Ray's own "
            f"{format_bytes(largest.ray_bytes)}); boards: {budgets}"
        )
    return (
        f"no split of the {len(manifest.blocks)} blocks over {len(boards)} board(s) fits their "
        f"budgets ({budgets}, each after Ray's own processes): give larger budgets or more boards"
    )
