"""The caller's side of a model over several boards: `ClusterModel` (run, run_many, generate over
the placed stages) and `load_on_cluster` / `plan_on_cluster`.

A request goes stage to stage as Ray objects, each stage's output handed straight to the next
actor (not through the caller); a decoder's KV cache stays on each board. Several requests in
flight keep every board busy: each actor runs its calls in order, so stage 0 starts request 2
while stage 1 runs request 1."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hermes_ort.cluster.connect import DEFAULT_TIMEOUT_S, ClusterError, gather, get_named
from hermes_ort.cluster.placement import Placement, kill_quietly, place
from hermes_ort.cluster.split import StagePlan
from hermes_ort.core.errors import HermesError, OptionError
from hermes_ort.core.manifest import load_manifest
from hermes_ort.generation.token_loop import (
    GenerationStats,
    Request,
    Sampling,
    as_given,
    combined_stats,
    generate_tokens,
    generation_request,
)
from hermes_ort.runtime.tasks import ChatAndEmbed
from hermes_ort.tensors.batch import batch_shape
from hermes_ort.tensors.inputs import check_inputs, sample_inputs
from hermes_ort.tensors.kv_cache import decoder_signature


class ClusterModel(ChatAndEmbed):
    """A model placed over several boards: `run`, `run_many`, `generate`, `stats`, `close` (the
    `Model` protocol of runtime/protocol.py, as `HermesModel`)."""

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
            get_named(ray, ref, self.placement.where(stage), "run", self.timeout_s)
        raise ClusterError(f"{self.placement.where(len(refs) - 1)} failed to run")

    def _check_open(self) -> None:
        if self._closed:
            raise HermesError(f"model '{self.model_dir}' on the cluster is closed")

    def _on_every_stage(self, calls: list, what: str) -> list:
        """The results of one call per stage, a failure named by its board and stage."""
        where = [self.placement.where(i) for i in range(len(calls))]
        return gather(self._ray, calls, where, what)

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
        return self._on_every_stage(
            [a.stats.remote() for a in self.placement.actors], "report its stats"
        )

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
        streamer: Callable[[int], Any] | None = None,
        *,
        in_flight: int | None = None,
    ) -> Any:
        """As `HermesModel.generate`, over the boards. A batch of prompts is split into
        `in_flight` groups (default: one per stage; one with a streamer, which sees each pass's
        tokens of the whole batch) generating at once, each group's passes pipelined with the
        others'; each board keeps its own layers' KV cache."""
        with self._generating:  # one generate at a time: each reserves its stages' caches
            self._check_open()
            sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
            request = generation_request(
                self.model_dir, self.decoder, input_ids, max_new_tokens, sampling, eos_token_id
            )
            prompts = request.prompts
            if in_flight is None:
                in_flight = 1 if streamer is not None else len(self.plan.stages)
            if not isinstance(in_flight, int) or in_flight < 1:
                raise OptionError(f"in_flight must be a whole number >= 1, got {in_flight!r}")
            parts = _row_groups(prompts.rows, in_flight)
            if streamer is not None and len(parts) > 1:
                raise OptionError(
                    "a streamer sees the whole batch's tokens: not with in_flight > 1"
                )
            rows, width = max(len(p) for p in parts), prompts.ids.shape[1]
            calls = [
                a.begin.remote(rows, width, request.total, len(parts))
                for a in self.placement.actors
            ]
            self._on_every_stage(calls, "reserve its KV cache")
            t0 = time.perf_counter()
            jobs = [
                partial(self._generate_rows, request, r, max_new_tokens, own, streamer)
                for r, own in zip(parts, _group_sampling(sampling, len(parts)), strict=True)
            ]
            results = _at_once(jobs)
            self.generation_stats = combined_stats(
                [stats for _, stats in results], time.perf_counter() - t0
            )
            return as_given(input_ids, request, [row for new, _ in results for row in new])

    def _generate_rows(
        self,
        request: Request,
        rows: range,
        max_new_tokens: int,
        sampling: Sampling,
        streamer: Callable[[Any], Any] | None,
    ) -> tuple[list[list[int]], GenerationStats]:
        """The prompts' `rows` generated as one request of their own, its cache on the boards."""
        request_id = f"{uuid.uuid4().hex[:8]}-{next(self._ids)}"
        prompts = request.prompts
        group = replace(
            prompts,
            ids=prompts.ids[rows.start : rows.stop],
            mask=prompts.mask[rows.start : rows.stop],
        )

        def run(feeds):
            return self._wait(self._submit(feeds, request_id)), _NoStats()

        try:
            return generate_tokens(
                run=run,
                sig=self.decoder,
                prompts=group,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                eos=request.eos,
                streamer=streamer,
                pad_id=request.pad,
                runner_keeps_cache=True,
            )
        finally:
            for a in self.placement.actors:
                a.end.remote(request_id)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        kill_quietly(self._ray, self.placement.actors)

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


def _group_sampling(sampling: Sampling, groups: int) -> list[Sampling]:
    """Each group its own random stream (seeded ones derived from the seed): sampled tokens are
    reproducible, not the same draws as one board's single batch."""
    if sampling.seed is None or groups == 1:
        return [sampling] * groups
    spawned = np.random.SeedSequence(sampling.seed).spawn(groups)
    return [replace(sampling, seed=int(s.generate_state(1)[0])) for s in spawned]


def _at_once(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Every job's result, each job in a thread of its own (one alone in the caller's); the
    first error is raised once every job has ended."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    if len(jobs) == 1:
        one(0)
    else:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return results


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
