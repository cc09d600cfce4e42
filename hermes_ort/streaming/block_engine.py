"""The execution engine: runs a plan of per-block sessions.

BlockEngine is the inference agent of PIPELOAD: it runs blocks in order while the loading agents
open the sessions of the next ones (at most `window` streamed sessions alive at once) and the daemon
destroys each executed one. Tensors are routed by name and freed after their last consumer
(dataflow.py). What each block's session is (kept, paged or streamed, prepacked or mapped, read
ahead, its pages dropped after use) is the plan's (plan.py); the engine only carries it out. A
paged block's session is opened once, before the first pass (paged_blocks.py); its "load" is a
prefetch of its pages and its "destruction" dropping them, in the same window slots."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from concurrent.futures import Future

import numpy as np

from hermes_ort.core.cpython import release_if_held
from hermes_ort.core.manifest import Manifest
from hermes_ort.core.stats import BlockStats, RunStats
from hermes_ort.core.trace import Trace
from hermes_ort.planning.plan import Plan
from hermes_ort.streaming.daemon import Daemon, destroy
from hermes_ort.streaming.integrity import Verifier
from hermes_ort.streaming.loader import LiveBlock, LoadingAgents
from hermes_ort.streaming.memory import PassMeasure, rss_bytes, trim_heap
from hermes_ort.streaming.paged_blocks import PagedBlocks
from hermes_ort.streaming.sessions import run_session
from hermes_ort.tensors.batch import (
    BatchShape,
    batch_shape,
    run_in_micro_batches,
    symbolic_first_dim,
)
from hermes_ort.tensors.dataflow import Tensors
from hermes_ort.tensors.kv_cache import decoder_signature
from hermes_ort.tensors.last_position import (
    last_logits_only,
    last_position_inputs,
    position_wise_blocks,
)


@contextlib.contextmanager
def _quick_gil_handoff(interval_s: float = 0.0002):
    """Shorter GIL switch interval during a pipelined run: with the default 5 ms, every hand-off
    between the inference agent, the loaders and the daemon can stall a block by up to 5 ms."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, interval_s))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


class _Slots:
    """The window: schedules loads in block order while fewer than `window` streamed sessions
    live."""

    def __init__(self, engine: BlockEngine):
        self.engine = engine
        self.cond = threading.Condition()
        self.next = 0
        self.live = 0
        self.max_live = 0
        self.futures: dict[int, Future] = {}
        self.pending_destroy = 0
        self.closed = False

    def fill(self) -> None:
        e = self.engine
        with self.cond:
            while not self.closed and self.next < len(e.manifest.blocks):
                i = self.next
                if i in e.resident:
                    self.next += 1
                    continue
                if self.live >= e.plan.window:
                    break
                self.live += 1
                self.max_live = max(self.max_live, self.live + len(e.resident))
                how, spec = e.plan.blocks[i], e.manifest.blocks[i]
                if i in e.paged.open:
                    self.futures[i] = e.loaders.prefetch(i, spec, e.paged.open[i])
                else:  # streamed (a paged block that could not be paged too)
                    self.futures[i] = e.loaders.submit(
                        i, spec, how.settings, how.readahead, how.drop_pages
                    )
                self.next += 1
            self.cond.notify_all()

    def free_one(self) -> None:
        with self.cond:
            self.live -= 1
        self.fill()

    def destroying(self) -> None:
        with self.cond:
            self.pending_destroy += 1

    def destroyed(self) -> None:
        with self.cond:
            self.pending_destroy -= 1
        self.free_one()

    def wait_daemon_lag(self, blocks: int) -> None:
        """Hold the inference agent while the daemon has more than `blocks` sessions to destroy:
        the memory model counts one executed block not yet destroyed, never more."""
        with self.cond:
            while self.pending_destroy > blocks:
                self.cond.wait(0.05)

    def take(self, i: int) -> Future:
        """The future of block i, once scheduled; raises the first loader failure seen, promptly."""
        with self.cond:
            while True:
                for fut in self.futures.values():
                    if fut.done() and not fut.cancelled() and fut.exception() is not None:
                        raise fut.exception()
                if i in self.futures:
                    return self.futures.pop(i)
                self.cond.wait(0.05)


class BlockEngine:
    def __init__(
        self,
        manifest: Manifest,
        plan: Plan,
        verifier: Verifier,
        trace: Trace | None = None,
        paged: PagedBlocks | None = None,
    ):
        """`paged`: the paged blocks a previous engine of this model opened (`take_paged`)."""
        self.model_dir = verifier.model_dir
        self.manifest = manifest
        self.plan = plan
        self.trace = trace or Trace(enabled=False)
        self.resident: dict[int, LiveBlock] = {}
        self.paged = paged or PagedBlocks(verifier, self.trace)
        self.paged.retain(plan)
        self.loaders = LoadingAgents(verifier, max(1, plan.loaders), trace)
        self.daemon = Daemon(self.model_dir, trace)
        self.keep_cached = _keep_cached(manifest, plan)
        self.position_wise = position_wise_blocks(manifest)  # the head's: last_logits
        sig = decoder_signature(manifest)
        self.logits = sig.logits if sig else None  # encoders: never cut

    def run(
        self, feeds: dict[str, np.ndarray], last_logits: bool = False
    ) -> tuple[dict[str, np.ndarray], RunStats]:
        """One pass; `last_logits`: a decoder's head blocks fed the last position only, its
        logits [rows, 1, vocab] (tensors/last_position.py)."""
        with _quick_gil_handoff():
            outputs, stats = self._run(feeds, last_logits)
        if last_logits and self.logits is not None:
            outputs = last_logits_only(outputs, self.logits)  # a head that was not cut
        return outputs, stats

    def _run(
        self, feeds: dict[str, np.ndarray], last_logits: bool
    ) -> tuple[dict[str, np.ndarray], RunStats]:
        slots = _Slots(self)
        block_stats: list[BlockStats] = []
        tensors = Tensors(self.manifest, feeds)
        shape = batch_shape(self.manifest, feeds)
        rows = shape.rows
        cut = self.position_wise if last_logits else frozenset()
        block = None
        with PassMeasure() as m:
            try:
                self.paged.open_all(self.manifest, self.plan)  # once: before the first pass
                slots.fill()
                for i, spec in enumerate(self.manifest.blocks):
                    how = self.plan.blocks[i]
                    t_wait = time.perf_counter()
                    kept = i in self.resident
                    block = self.resident[i] if kept else slots.take(i).result()
                    slots.wait_daemon_lag(self.plan.lag)
                    wait_s = time.perf_counter() - t_wait
                    t_run = time.perf_counter()
                    what = f"block '{spec.name}'"
                    shrink_at = len(self.manifest.blocks) - 1 if self.plan.budget_bytes else -1
                    values = run_in_micro_batches(
                        lambda x, b=block, o=list(spec.outputs), w=what, k=shrink_at == i: (
                            run_session(b.session, o, x, w, k)
                        ),
                        # no local: the activations go as soon as the block has run
                        _block_inputs(tensors, i, i in cut, shape),
                        rows,
                        self.plan.batch.micro_batch or rows,
                        *(
                            per_row(block, spec.outputs)
                            if self.plan.batch.micro_batch
                            else (None, None)
                        ),
                    )
                    run_s = time.perf_counter() - t_run
                    self.trace.add(spec.name, "wait", t_wait, t_run)
                    self.trace.add(spec.name, "run", t_run, t_run + run_s)
                    tensors.put(i, values)
                    load = (0.0, 0.0) if kept else (block.readahead_s, block.create_s)
                    block_stats.append(BlockStats(spec.name, kept, wait_s, *load, run_s))
                    if kept:
                        continue
                    if block.paged is not None:
                        self._drop_paged(block, how.drop_pages, slots)
                        continue
                    if how.resident:
                        self.resident[i] = block
                        slots.free_one()  # its pages: dropped by its loader (`drop_packed_pages`)
                        continue
                    if self.plan.lag == 0:
                        # unmap now, in this thread: nothing to wait for on the critical path;
                        # the daemon still trims the heap and drops the page cache
                        block.session = None
                        done = slots.free_one
                    else:
                        slots.destroying()
                        done = slots.destroyed
                    self.daemon.release(block, how.drop_pages, self.keep_cached[i], done)
            except BaseException:  # Ctrl-C or a failure: whoever keeps the traceback keeps this
                # frame; it must not keep a streamed block's session or the activations
                if block is not None and all(b is not block for b in self.resident.values()):
                    block.session = None
                tensors.clear()
                raise
            finally:
                self._drain(slots)
        self.trace.add("", "pass", m.t0, m.t0 + m.latency_s)
        stats = RunStats(
            strategy=self.plan.strategy,
            loaders=self.plan.loaders,
            window=self.plan.window,
            latency_s=m.latency_s,
            peak_rss_bytes=m.peak,
            rss_before_bytes=m.rss_before,
            rss_after_bytes=rss_bytes(),
            bytes_read=m.bytes_read,
            max_live_sessions=max(slots.max_live, len(self.resident)),
            blocks=tuple(block_stats),
        )
        return tensors.outputs(), stats

    def _drop_paged(self, block: LiveBlock, drop_cache: bool, slots: _Slots) -> None:
        """An executed paged block's pages go: now, in this thread, with lag 0 (one executed
        block in memory, never two), else on the daemon."""
        if self.plan.lag == 0:
            paged, block.session = block.paged, None
            paged.drop(drop_cache)
            slots.free_one()
            return
        slots.destroying()
        self.daemon.drop_paged(block, drop_cache, slots.destroyed)

    def _drain(self, slots: _Slots) -> None:
        """After a run (or its failure): no load pending, every streamed session destroyed."""
        release_if_held(slots.cond)  # a hold left by Ctrl-C (core/cpython.py)
        with slots.cond:
            slots.closed = True
            pending = list(slots.futures.values())
            slots.futures.clear()
        for fut in pending:
            if fut.cancel():
                continue
            try:
                block = fut.result()
            except BaseException:  # a failed load left nothing open
                continue
            if block.paged is not None:  # prefetched, never run: its session stays open
                block.paged.drop()
                block.session = None
                continue
            destroy(block, self.model_dir, False, set())
        self.daemon.release_barrier()

    def take_paged(self) -> PagedBlocks:
        """Hand the open paged blocks to the model's next engine (this one closes without)."""
        paged, self.paged = self.paged, PagedBlocks(self.paged.verifier, self.trace)
        return paged

    def close(self) -> None:
        self.loaders.shutdown()
        self.daemon.shutdown()
        for block in self.resident.values():
            block.session = None
        self.resident.clear()
        self.paged.close()
        trim_heap()


def _keep_cached(manifest: Manifest, plan: Plan) -> list[set[str]]:
    """Per block: the files whose pages the daemon must keep when it drops that block's: those
    later blocks of the pass read, every file of a block whose pages are never dropped (a sparse
    embedding lookup would fault them in from storage, one by one, on every run: bert-base's
    prologue 186 ms a pass instead of 0.5 ms) and the shared files of resident blocks."""
    always: set[str] = set()
    for spec, how in zip(manifest.blocks, plan.blocks, strict=True):
        if not how.drop_pages:
            always |= {f.path for f in spec.files}
        elif how.resident:
            always |= {f.path for f in spec.files if not spec.is_own(f)}
    keep: list[set[str]] = []
    later: set[str] = set()
    for spec in reversed(manifest.blocks):
        keep.append(later | always)
        later = later | {f.path for f in spec.files}
    return keep[::-1]


def _block_inputs(tensors: Tensors, i: int, last: bool, shape: BatchShape) -> dict:
    """Block i's inputs; `last`: a position-wise block's at the last position only
    ([rows, positions, hidden] -> [rows, 1, hidden]; the whole tensors stay for other readers)."""
    inputs = tensors.inputs_of(i)
    return last_position_inputs(inputs, shape.rows, shape.positions) if last else inputs


def per_row(block: LiveBlock, outputs: tuple[str, ...]) -> tuple[set[str], list[bool]]:
    """The block's inputs and outputs (in `outputs` order) that carry the batch on axis 0, as its
    session declares them."""
    session = block.session
    ins = {x.name for x in session.get_inputs() if symbolic_first_dim(x.shape)}
    declared = {x.name: symbolic_first_dim(x.shape) for x in session.get_outputs()}
    return ins, [declared.get(name, True) for name in outputs]
