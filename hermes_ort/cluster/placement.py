"""Placing a model on the boards: one stage actor pinned to each board, the blocks split by what
the boards report, every stage opened (`place` -> `Placement`); actors killed quietly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes_ort.cluster.connect import (
    ClusterError,
    alive_boards,
    budgets_per_board,
    connect,
    gather,
    measured_board,
)
from hermes_ort.cluster.split import StagePlan, split_blocks
from hermes_ort.cluster.stage_actor import StageActor
from hermes_ort.cluster.stage_spec import StageSpec, stage_specs
from hermes_ort.core.manifest import load_manifest


@dataclass(frozen=True)
class Placement:
    """Where each stage runs: its board and actor."""

    plan: StagePlan
    specs: tuple[StageSpec, ...]
    actors: tuple[Any, ...]

    def where(self, stage: int) -> str:
        s = self.plan.stages[stage]
        names = self.plan.block_names
        span = names[s.first] + (f"..{names[s.last - 1]}" if s.blocks > 1 else "")
        return f"board '{s.board.name}' (stage {stage}, blocks {span})"


def place(
    model_dir: Path,
    cluster: str,
    memory_budget: Any = None,
    boards: Sequence[str] | None = None,
    verify: str = "once",
    plan_only: bool = False,
) -> tuple[Placement, Any]:
    """Probe the boards, split the blocks, open every stage (its files checked first)."""
    ray = connect(cluster)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    manifest = load_manifest(model_dir)
    nodes = alive_boards(ray, boards)
    names = [n["NodeName"] for n in nodes]
    if len(set(names)) != len(names):
        raise ClusterError(f"boards share a name ({names}): start each with its own `--node-name`")
    budgets = budgets_per_board(memory_budget, names)
    remote = ray.remote(num_cpus=0, max_restarts=0)(StageActor)
    actors = [
        remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            name=None,
        ).remote()
        for n in nodes
    ]
    try:
        probes = gather(ray, [a.probe.remote() for a in actors], names, "report itself")
        found = tuple(
            measured_board(name, p, budgets[name]) for name, p in zip(names, probes, strict=True)
        )
        seen = gather(
            ray, [a.profile.remote(str(model_dir)) for a in actors], names, "read its profile"
        )
        profiles = {b.node_id: p for b, p in zip(found, seen, strict=True)}
        plan = split_blocks(manifest, profiles, found)
        order = [next(i for i, b in enumerate(found) if b is s.board) for s in plan.stages]
        stage_actors = tuple(actors[i] for i in order)
        for i, a in enumerate(actors):
            if i not in order:
                ray.kill(a)
        specs = stage_specs(manifest, plan.cuts)
        placement = Placement(plan, specs, stage_actors)
        if not plan_only:
            calls = [
                a.open.remote(str(model_dir), spec, s.board.budget_bytes, verify)
                for a, spec, s in zip(stage_actors, specs, plan.stages, strict=True)
            ]
            where = [placement.where(i) for i in range(len(calls))]
            gather(ray, calls, where, "open its stage")
        return placement, ray
    except BaseException:
        kill_quietly(ray, actors)
        raise


def kill_quietly(ray, actors: Iterable[Any]) -> None:
    """Kill every actor, ignoring those whose board is gone already."""
    for a in actors:
        with contextlib.suppress(Exception):  # its board may be gone already
            ray.kill(a)
