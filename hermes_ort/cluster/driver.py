"""One model over several boards on a Ray cluster: `load(model_dir, cluster=ADDRESS)`.

Each board (a Ray node: `ray start --address HEAD:PORT --node-name NAME`) runs one stage actor,
pinned to its node, holding its stage's block sessions (stage.py: the single-board engine under
the board's budget). The split is planned from what every board reports (stages.py). A request
goes stage to stage as Ray objects, each stage's output handed straight to the next actor (not
through the caller); a decoder's KV cache stays on each board. Several requests in flight keep
every board busy: each actor runs its calls in order, so stage 0 starts request 2 while stage 1
runs request 1. Ray is imported only here, only when a cluster is asked for (extra `cluster`)."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from hermes_ort.cluster.split import Board, StagePlan, split_blocks
from hermes_ort.cluster.stage_spec import StageSpec, stage_specs
from hermes_ort.core.errors import BudgetError, HermesError, OptionError
from hermes_ort.core.manifest import load_manifest
from hermes_ort.core.units import format_bytes, parse_bytes
from hermes_ort.generation.token_loop import (
    GenerationStats,
    Prompts,
    Sampling,
    as_given,
    generate_tokens,
    generation_request,
)
from hermes_ort.planning.layer_profile import read_profile
from hermes_ort.tensors.batch import batch_shape
from hermes_ort.tensors.inputs import check_inputs, sample_inputs
from hermes_ort.tensors.kv_cache import decoder_signature

RAY_PROCESS_NAMES = ("gcs_server",)  # on the head, beside the raylet's own processes
DEFAULT_TIMEOUT_S = 600.0  # a stage call that long is a board gone quiet, not a slow block


class ClusterError(HermesError):
    """A board died, left the cluster, or failed its stage: names the board and the stage."""


def _ray():
    try:
        import ray
    except ImportError:
        raise OptionError(
            "a cluster needs Ray: pip install 'hermes-ort[cluster]' (on every board too)"
        ) from None
    return ray


def connect(address: str) -> Any:
    """Join the Ray cluster at `address` ("auto": the one this machine's `ray start` joined)."""
    ray = _ray()
    if not isinstance(address, str) or not address:
        raise OptionError(f"cluster must be 'auto' or 'HOST:PORT', got {address!r}")
    _reachable(address)
    if ray.is_initialized():
        joined = ray.get_runtime_context().gcs_address
        if address != "auto" and address.rpartition(":")[2] != joined.rpartition(":")[2]:
            raise ClusterError(
                f"this process is in the Ray cluster at '{joined}' already; it cannot join "
                f"'{address}' too (one cluster per process)"
            )
    else:
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ClusterError(f"cannot join the Ray cluster at '{address}': {e}") from None
    return ray


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """HOST:PORT must accept a connection within `timeout_s` (ray.init retries for minutes)."""
    if address == "auto":
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise OptionError(f"cluster must be 'auto' or 'HOST:PORT', got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterError(
            f"no Ray cluster answers at '{address}' ({e.strerror or e}): start its head with "
            f"`ray start --head --port {port}`"
        ) from None


# -- the actor on each board ------------------------------------------------------------------


class StageActor:
    """Lives in a Ray worker on one board: reports the board, then opens and runs one stage."""

    def __init__(self):
        self.runner = None

    def probe(self) -> dict:
        """This board: its name, CPUs, the RSS of Ray's other processes here, this worker's own
        RSS (the stage's baseline), and the memory it could still give a stage."""
        import psutil

        import hermes_ort.cluster.stage_runner  # noqa: F401 - the stage's baseline: ONNX Runtime loaded
        from hermes_ort.core.machine import available_memory, cgroup_memory_limit, default_threads
        from hermes_ort.streaming.memory import rss_bytes

        me = psutil.Process()
        ray_pids: set[int] = set()
        raylet = me.parent()
        if raylet is not None:
            ray_pids.add(raylet.pid)
            ray_pids |= {p.pid for p in raylet.children(recursive=True)}
        head = _is_head()
        if head:
            for p in psutil.process_iter(["name"]):
                if p.info["name"] in RAY_PROCESS_NAMES:
                    ray_pids.add(p.pid)
        ray_pids.discard(me.pid)
        ray_bytes = 0
        for pid in ray_pids:
            try:
                ray_bytes += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
        own = rss_bytes()
        free = [x for x in (available_memory(),) if x is not None]
        free = [f + own for f in free]
        limit = cgroup_memory_limit()
        if limit is not None:
            free.append(limit - ray_bytes)
        return {
            "node_id": _ray().get_runtime_context().get_node_id(),
            "cpus": default_threads(),
            "ray_bytes": ray_bytes,
            "baseline_bytes": own,
            "free_bytes": min(free) if free else None,
            "head": head,
        }

    def profile(self, model_dir: str):
        """The layer profile stored beside the model if it matches this board (machine, cores,
        ONNX Runtime), else None: what the split plans this board's stages with."""
        return read_profile(model_dir)

    def open(self, model_dir: str, spec: StageSpec, budget: int, verify: str) -> dict:
        from hermes_ort.cluster.stage_runner import StageRunner

        self.runner = StageRunner(model_dir, spec, budget, verify=verify)
        return self.runner.plan.to_json()

    def run(self, feeds: dict, request=None, cache: dict | None = None, shape=None) -> dict:
        return self.runner.run(feeds, request, cache, shape)

    def begin(self, rows: int, prompt: int, positions: int, in_flight: int) -> None:
        self.runner.begin(rows, prompt, positions, in_flight)

    def end(self, request: str) -> None:
        self.runner.end(request)

    def stats(self) -> dict:
        s = self.runner.stats
        return {
            "latency_s": s.latency_s if s else None,
            "peak_rss_bytes": s.peak_rss_bytes if s else None,
            "bytes_read": s.bytes_read if s else None,
            "cache_bytes": self.runner.cache_bytes(),
        }

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None


def _is_head() -> bool:
    ray = _ray()
    node = ray.get_runtime_context().get_node_id()
    for n in ray.nodes():
        if n["NodeID"] == node:
            return "node:__internal_head__" in n.get("Resources", {})
    return False


# -- placing a model --------------------------------------------------------------------------


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


def alive_boards(ray, names: Sequence[str] | None) -> list[dict]:
    """The Ray nodes to use: those named (by `--node-name`), else every alive node but the head
    (unless the head is all there is)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if names is not None:
        by_name = {n["NodeName"]: n for n in nodes}
        missing = [b for b in names if b not in by_name]
        if missing:
            raise ClusterError(
                f"board(s) {missing} are not alive in the cluster; alive: {sorted(by_name)}"
            )
        return [by_name[b] for b in names]
    workers = [n for n in nodes if "node:__internal_head__" not in n.get("Resources", {})]
    return sorted(workers or nodes, key=lambda n: n["NodeName"])


def _budgets(memory_budget: Any, names: list[str]) -> dict[str, int | None]:
    """Per board: bytes given, or None (what the board reports free)."""
    if isinstance(memory_budget, dict):
        unknown = sorted(set(memory_budget) - set(names))
        if unknown:
            raise OptionError(f"memory_budget names unknown board(s) {unknown}; boards: {names}")
        return {n: parse_bytes(memory_budget.get(n)) for n in names}
    if isinstance(memory_budget, str) and memory_budget.strip().lower() == "min":
        raise OptionError("memory_budget 'min' is for one board; give each board's budget")
    value = parse_bytes(memory_budget)
    return dict.fromkeys(names, value)


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
    budgets = _budgets(memory_budget, names)
    remote = ray.remote(num_cpus=0, max_restarts=0)(StageActor)
    actors = [
        remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            name=None,
        ).remote()
        for n in nodes
    ]
    try:
        probes = _gather(ray, [a.probe.remote() for a in actors], names, "report itself")
        found = tuple(_board(name, p, budgets[name]) for name, p in zip(names, probes, strict=True))
        seen = _gather(
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
            _gather(ray, calls, where, "open its stage")
        return placement, ray
    except BaseException:
        for a in actors:
            with contextlib.suppress(Exception):  # its board may be gone already
                ray.kill(a)
        raise


def _board(name: str, probe: dict, given: int | None) -> Board:
    ray_bytes = probe["ray_bytes"]
    if given is None:
        if probe["free_bytes"] is None:
            raise ClusterError(f"board '{name}' reports no free memory: give its memory_budget")
        budget, how = probe["free_bytes"], "reported free"
    else:
        budget, how = given - ray_bytes, f"given {format_bytes(given)}"
    if budget <= probe["baseline_bytes"]:
        raise BudgetError(
            f"board '{name}': memory budget {format_bytes(given or budget)} leaves "
            f"{format_bytes(budget)} after Ray's own processes there "
            f"({format_bytes(ray_bytes)}), not more than a stage's baseline "
            f"({format_bytes(probe['baseline_bytes'])})"
        )
    return Board(
        name, probe["node_id"], budget, ray_bytes, probe["baseline_bytes"], probe["cpus"], how
    )


def _gather(ray, refs: list, where: list[str], what: str, timeout: float = DEFAULT_TIMEOUT_S):
    """ray.get of calls to several boards, each failure named by its board (and stage)."""
    out = []
    for ref, place_ in zip(refs, where, strict=True):
        out.append(_get(ray, ref, place_, what, timeout))
    return out


def _get(ray, ref, where: str, what: str, timeout: float):
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(f"{where} did not {what} within {timeout:.0f} s") from None
    except ray.exceptions.RayTaskError as e:  # the stage raised: its own error, named
        cause = e.cause if isinstance(e.cause, BaseException) else e
        if isinstance(cause, HermesError):
            raise type(cause)(f"{where}: {cause}") from None
        raise ClusterError(f"{where} failed to {what}: {cause!r}") from None
    except (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError) as e:
        raise ClusterError(
            f"{where} died or left the cluster: {_first_line(e)}; place the model again on the "
            f"boards that remain (hermes_ort.load(..., cluster=...))"
        ) from None
    except ray.exceptions.RayError as e:
        raise ClusterError(f"{where}: Ray failed: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1].strip() if text else type(e).__name__


# -- the model ---------------------------------------------------------------------------------


class ClusterModel:
    """A model placed over several boards: `run`, `run_many`, `generate`, `stats`, `close`."""

    def __init__(self, model_dir: Path, placement: Placement, ray, timeout_s: float):
        self.model_dir = model_dir
        self.manifest = load_manifest(model_dir)
        self.decoder = decoder_signature(self.manifest)
        self.placement = placement
        self.plan = placement.plan
        self.timeout_s = timeout_s
        self.stats: dict | None = None
        self.generation_stats: GenerationStats | None = None
        self._ray = ray
        self._closed = False
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._generating = threading.Lock()

    # one request through every stage: each actor's output handed to the next as a Ray object
    def _submit(self, feeds: dict[str, np.ndarray], request: str | None = None):
        """`feeds` through every stage; a decoder's pasts in `feeds` (a pass on its own) go to
        the stage whose layers they are."""
        shape = batch_shape(self.manifest, feeds)
        pasts = {k: feeds.pop(k) for k in list(feeds) if k.startswith("past_key_values.")}
        ref = self._ray.put(feeds)
        refs = []
        for actor, spec in zip(self.placement.actors, self.placement.specs, strict=True):
            own = {p: pasts[p] for p, _ in spec.cache if p in pasts} or None
            ref = actor.run.remote(ref, request, own, (shape.rows, shape.positions))
            refs.append(ref)
        return refs

    def _wait(self, refs: list) -> dict[str, np.ndarray]:
        """The last stage's outputs (only they come back to the caller); a failure is named by
        the first stage whose call failed, as soon as Ray knows of it."""
        ray = self._ray
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                done = [r for r in refs if ray.wait([r], timeout=0, fetch_local=False)[0]]
                where = self.placement.where(min(len(done), len(refs) - 1))
                raise ClusterError(f"{where} gave no result within {self.timeout_s:.0f} s")
            ready, _ = ray.wait(refs[-1:], timeout=min(left, 1.0))
            if ready:
                break
        try:
            return ray.get(refs[-1])
        except ray.exceptions.RayError:
            pass
        for stage, ref in enumerate(refs):  # which stage failed first
            _get(ray, ref, self.placement.where(stage), "run", self.timeout_s)
        raise ClusterError(f"{self.placement.where(len(refs) - 1)} failed to run")

    def _check_open(self) -> None:
        if self._closed:
            raise HermesError(f"model '{self.model_dir}' on the cluster is closed")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass over the stages (a batch: rows split into requests in flight, one
        per stage, so that every board works at once; outputs joined in order). A decoder's
        pass returns its outputs but the KV cache (the presents stay on the boards: use
        `generate`)."""
        self._check_open()
        feeds = check_inputs(self.manifest, inputs)
        rows = next(iter(feeds.values())).shape[0]
        parts = _row_groups(rows, len(self.plan.stages)) if rows > 1 else [range(rows)]
        if len(parts) == 1:
            return self._timed([feeds])[0]
        requests = [{k: v[r.start : r.stop] for k, v in feeds.items()} for r in parts]
        outs = self._timed(requests)
        return {k: np.concatenate([o[k] for o in outs], axis=0) for k in outs[0]}

    def run_many(self, requests: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Several inputs in flight at once (each stage busy with a different one)."""
        self._check_open()
        return self._timed([check_inputs(self.manifest, r) for r in requests])

    def _timed(self, requests: list[dict]) -> list[dict]:
        t0 = time.perf_counter()
        chains = [self._submit(f) for f in requests]
        outs = [self._wait(c) for c in chains]
        self.stats = {"latency_s": time.perf_counter() - t0, "requests": len(requests)}
        return [_own(o) for o in outs]

    def sample_inputs(
        self, batch_size: int = 1, sequence_length: int | None = None, seed: int = 0
    ) -> dict[str, np.ndarray]:
        return sample_inputs(self.manifest, batch_size, sequence_length, seed)

    def stage_stats(self) -> list[dict]:
        """Each stage's last pass (its board's peak RSS, bytes read) and the caches it holds."""
        self._check_open()
        calls = [a.stats.remote() for a in self.placement.actors]
        where = [self.placement.where(i) for i in range(len(calls))]
        return _gather(self._ray, calls, where, "report its stats")

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        in_flight: int | None = None,
    ) -> Any:
        """As `HermesModel.generate`, over the boards. A batch of prompts is split into
        `in_flight` groups (default: one per stage) generating at once, each group's passes
        pipelined with the others'; each board keeps its own layers' KV cache."""
        with self._generating:  # one generate at a time: each reserves its stages' caches
            self._check_open()
            sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
            request = generation_request(
                self.model_dir, self.decoder, input_ids, max_new_tokens, sampling, eos_token_id
            )
            prompts, eos, pad = request.prompts, request.eos, request.pad
            groups = len(self.plan.stages) if in_flight is None else in_flight
            if not isinstance(groups, int) or groups < 1:
                raise OptionError(f"in_flight must be a whole number >= 1, got {in_flight!r}")
            parts = _row_groups(prompts.rows, groups)
            rows, width = max(len(p) for p in parts), prompts.ids.shape[1]
            calls = [
                a.begin.remote(rows, width, request.total, len(parts))
                for a in self.placement.actors
            ]
            where = [self.placement.where(i) for i in range(len(calls))]
            _gather(self._ray, calls, where, "reserve its KV cache")
            results: list[Any] = [None] * len(parts)
            errors: list[BaseException] = []

            def one(g: int, r: range) -> None:
                request_id = f"{uuid.uuid4().hex[:8]}-{next(self._ids)}"
                sub = Prompts(
                    prompts.ids[r.start : r.stop], prompts.mask[r.start : r.stop], False, False
                )

                def run(feeds):
                    return self._wait(self._submit(feeds, request_id)), _NoStats()

                # each group its own random stream (seeded ones derived from the seed): sampled
                # tokens are reproducible, not the same draws as one board's single batch
                own = sampling
                if sampling.seed is not None and len(parts) > 1:
                    spawned = np.random.SeedSequence(sampling.seed).spawn(len(parts))[g]
                    own = replace(sampling, seed=int(spawned.generate_state(1)[0]))
                try:
                    results[g] = generate_tokens(
                        run,
                        self.decoder,
                        sub,
                        max_new_tokens,
                        own,
                        eos,
                        None,
                        pad,
                        runner_keeps_cache=True,
                    )
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    errors.append(e)
                finally:
                    for a in self.placement.actors:
                        a.end.remote(request_id)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=one, args=(g, r)) for g, r in enumerate(parts)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            new = [row for res in results for row in res[0]]
            total_s = time.perf_counter() - t0
            count = sum(len(n) for n in new)
            first = max(res[1].time_to_first_token_s for res in results)
            self.generation_stats = GenerationStats(
                prompt_tokens=int(prompts.mask.sum()),
                new_tokens=count,
                time_to_first_token_s=first,
                total_s=total_s,
                decode_tokens_per_s=(count - prompts.rows) / (total_s - first)
                if count > prompts.rows and total_s > first
                else 0.0,
                peak_rss_bytes=0,
                bytes_read=0,
                cache_bytes=sum(res[1].cache_bytes for res in results),
                stopped_by="eos"
                if all(res[1].stopped_by == "eos" for res in results)
                else "max_new_tokens",
                batch_size=prompts.rows,
            )
            return as_given(input_ids, request, new)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for a in self.placement.actors:
            with contextlib.suppress(Exception):  # a board already gone
                self._ray.kill(a)

    def __enter__(self) -> ClusterModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ClusterModel('{self.model_dir}', {len(self.plan.stages)} stages)"


class _NoStats:
    """What generate_tokens reads of a pass's stats; per board figures: `stage_stats()`."""

    peak_rss_bytes = 0
    bytes_read = 0


def _own(outputs: dict) -> dict:
    """Arrays from Ray's object store are read-only views of shared memory: copies the caller
    owns (and may write)."""
    return {k: np.array(v) for k, v in outputs.items()}


def _row_groups(rows: int, groups: int) -> list[range]:
    """`rows` split into at most `groups` contiguous groups of near-equal size."""
    groups = max(1, min(groups, rows))
    size, extra = divmod(rows, groups)
    out, start = [], 0
    for g in range(groups):
        stop = start + size + (1 if g < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def load_on_cluster(
    model_dir: str | Path,
    cluster: str,
    memory_budget: Any = None,
    boards: Sequence[str] | None = None,
    verify: str = "once",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ClusterModel:
    model_dir = Path(model_dir).resolve()
    placement, ray = place(model_dir, cluster, memory_budget, boards, verify)
    return ClusterModel(model_dir, placement, ray, timeout_s)


def plan_on_cluster(
    model_dir: str | Path, cluster: str, memory_budget: Any = None, boards=None
) -> StagePlan:
    """The split `load_on_cluster` would make (the boards probed, nothing opened)."""
    placement, ray = place(
        Path(model_dir).resolve(), cluster, memory_budget, boards, plan_only=True
    )
    for a in placement.actors:
        ray.kill(a)
    return placement.plan
