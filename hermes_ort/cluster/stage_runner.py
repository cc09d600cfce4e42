"""One stage on its board: its blocks run by the single-board engine under the board's budget,
its files checked before anything runs, its KV cache kept per request. No Ray here
(placement.py places stages on boards, driver.py passes tensors between them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hermes_ort.cluster.stage_spec import StageSpec, stage_manifest, stage_profile
from hermes_ort.core.errors import HermesError
from hermes_ort.core.manifest import load_manifest
from hermes_ort.core.stats import RunStats
from hermes_ort.planning.layer_profile import read_profile
from hermes_ort.planning.strategies import get_strategy, opened_graphs
from hermes_ort.runtime.model import HermesModel
from hermes_ort.runtime.model_planner import ModelPlanner, PlanOptions
from hermes_ort.streaming.integrity import Verifier
from hermes_ort.tensors.batch import BatchShape
from hermes_ort.tensors.kv_cache import decoder_signature


class StageRunner:
    """Stage `spec` of the model in `model_dir`, planned under `budget` bytes (None: no limit) on
    this board. Every file of its blocks is checked by sha256 before anything runs."""

    def __init__(
        self,
        model_dir: str | Path,
        spec: StageSpec,
        budget: int | None,
        verify: str = "once",
        page_cache: str = "auto",
    ):
        self.model_dir = Path(model_dir)
        self.spec = spec
        whole = load_manifest(self.model_dir)
        self.manifest = stage_manifest(whole, spec)
        verifier = Verifier(self.model_dir, verify)
        verifier.check_graphs(opened_graphs(self.manifest, get_strategy("pipeload")))
        self.planner = ModelPlanner(
            self.model_dir,
            self.manifest,
            "pipeload",
            stage_profile(read_profile(self.model_dir), spec),
            PlanOptions(page_cache=page_cache),
        )
        plan = self.planner.plan(budget)
        cost = self.planner.cost_under(budget)
        self.model = HermesModel(self.manifest, plan, cost, verifier, replan=self.planner.plan)
        if spec.cache:  # a decoder's stage: its batches are planned with its caches (`begin`)
            self.model.decoder = decoder_signature(whole)
        self._caches: dict[str, dict[str, np.ndarray]] = {}  # request -> past name -> array

    @property
    def plan(self):
        return self.model.plan

    @property
    def stats(self) -> RunStats | None:
        return self.model.stats

    def run(
        self,
        feeds: dict[str, np.ndarray],
        request: str | None = None,
        cache: dict[str, np.ndarray] | None = None,
        shape: tuple[int, int] | None = None,
    ) -> dict:
        """One pass of the stage's blocks over `feeds` (what it takes); returns what it hands on.
        `request`: a generation's id, whose KV cache this stage keeps (its first pass starts an
        empty one; `end(request)` frees it). Without one, a pass on its own: this stage's pasts
        from `cache` (else empty), its presents dropped."""
        feeds = {t: feeds[t] for t in self.spec.takes if t in feeds}
        missing = [t for t in self.spec.takes if t not in feeds]
        if missing:
            raise HermesError(f"stage {self.spec.index} is missing its input(s) {missing}")
        if self.spec.cache:
            given = {p: cache[p] for p, _ in self.spec.cache if cache and p in cache}
            if request is not None and request in self._caches:
                given = self._caches[request]
            feeds.update(given if len(given) == len(self.spec.cache) else self._empty(feeds))
        outputs = self.model.run_feeds(feeds, BatchShape(*shape) if shape else None)
        if self.spec.cache:
            presents = {p: outputs.pop(q) for p, q in self.spec.cache}
            if request is not None:
                self._caches[request] = presents
        return outputs

    def begin(self, rows: int, prompt: int, positions: int, in_flight: int = 1) -> None:
        """Generations of `rows` x `prompt` tokens growing to `positions` start, `in_flight` of
        them at once: the blocks are planned for that batch in the budget minus this stage's
        caches of them all."""
        if self.spec.cache:
            batch = BatchShape(rows, prompt) if rows > 1 else None
            self.model.reserve_cache(in_flight * self.cache_size(rows, positions), batch)

    def end(self, request: str) -> None:
        self._caches.pop(request, None)

    def _empty(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The pasts of a first pass: [batch, kv_heads, 0, head_dim] each."""
        rows = next(iter(feeds.values())).shape[0]
        specs = {t.name: t for t in self.manifest.inputs}
        return {
            p: np.zeros((rows, specs[p].shape[1], 0, specs[p].shape[3]), specs[p].dtype)
            for p, _ in self.spec.cache
        }

    def cache_bytes(self) -> int:
        """The KV caches this stage holds now."""
        return sum(v.nbytes for c in self._caches.values() for v in c.values())

    def cache_size(self, rows: int, positions: int) -> int:
        """Bytes of this stage's KV cache for `rows` x `positions`."""
        specs = {t.name: t for t in self.manifest.inputs}
        return sum(
            rows
            * specs[p].shape[1]
            * positions
            * specs[p].shape[3]
            * np.dtype(specs[p].dtype).itemsize
            for p, _ in self.spec.cache
        )

    def close(self) -> None:
        self._caches.clear()
        self.model.close()
