"""The execution engine: runs a plan.

BlockEngine is the inference agent of PIPELOAD: it runs blocks in order while the loading agents
open the sessions of the next ones (at most `window` streamed sessions alive at once) and the daemon
destroys each executed one. Tensors are routed by name and freed after their last consumer.
FullEngine runs the whole-model file in one session (the `full` and `full-mmap` baselines)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from hermes_ort.daemon import Daemon, destroy
from hermes_ort.errors import HermesError
from hermes_ort.integrity import check_file
from hermes_ort.loader import LiveBlock, LoadingAgents
from hermes_ort.manifest import Manifest, last_consumers
from hermes_ort.memory import (
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    storage_read_bytes,
    trim_heap,
)
from hermes_ort.planner import Plan
from hermes_ort.sessions import SessionSettings, create_session, run_session
from hermes_ort.stats import BlockStats, RunStats


class _Measure:
    """Latency, peak RSS, and storage reads of one run."""

    def __enter__(self) -> _Measure:
        reset_peak_rss()
        self.rss_before = rss_bytes()
        self.read_before = storage_read_bytes()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.latency_s = time.perf_counter() - self.t0
        self.peak = max(peak_rss_bytes(), self.rss_before)
        self.bytes_read = storage_read_bytes() - self.read_before


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
    """The window: schedules loads in block order while fewer than `window` streamed sessions live."""

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
                self.futures[i] = e.loaders.submit(
                    i, e.manifest.blocks[i], e.plan.settings_for(i), e.plan.reads_ahead(i)
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
    def __init__(self, model_dir: Path, manifest: Manifest, plan: Plan):
        self.model_dir = model_dir
        self.manifest = manifest
        self.plan = plan
        self.resident: dict[int, LiveBlock] = {}
        self.loaders = LoadingAgents(model_dir, max(1, plan.loaders))
        self.daemon = Daemon(model_dir)
        self.last_use = last_consumers(manifest)
        # files each block's successors still need this run: the daemon keeps those cached
        self.files_after: list[set[str]] = []
        later: set[str] = set()
        for block in reversed(manifest.blocks):
            self.files_after.append(set(later))
            later |= {f.path for f in block.files}
        self.files_after.reverse()
        # kept blocks' files, and those of sparse ones (embedding lookups, not read ahead): the
        # few pages a lookup touches would otherwise fault in from storage, one by one, on the
        # inference agent, every run (bert-base's prologue: 186 ms a pass instead of 0.5 ms)
        for i in (*plan.resident, *plan.no_readahead):
            self.files_after = [
                s | {f.path for f in manifest.blocks[i].files} for s in self.files_after
            ]

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], RunStats]:
        with _quick_gil_handoff():
            return self._run(feeds)

    def _run(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], RunStats]:
        slots = _Slots(self)
        block_stats: list[BlockStats] = []
        env = dict(feeds)
        outputs_wanted = set(self.manifest.output_names)
        block = None
        with _Measure() as m:
            try:
                slots.fill()
                for i, spec in enumerate(self.manifest.blocks):
                    t_wait = time.perf_counter()
                    kept = i in self.resident
                    block = self.resident[i] if kept else slots.take(i).result()
                    slots.wait_daemon_lag(self.plan.lag)
                    wait_s = time.perf_counter() - t_wait
                    t_run = time.perf_counter()
                    names = list(spec.outputs)
                    values = run_session(
                        block.session,
                        names,
                        {n: env[n] for n in spec.inputs},
                        f"block '{spec.name}'",
                    )
                    run_s = time.perf_counter() - t_run
                    env.update(zip(names, values, strict=True))
                    for name in [
                        n for n in env if self.last_use.get(n, -1) <= i and n not in outputs_wanted
                    ]:
                        del env[name]
                    block_stats.append(
                        BlockStats(
                            spec.name,
                            kept,
                            wait_s,
                            0.0 if kept else block.readahead_s,
                            0.0 if kept else block.create_s,
                            run_s,
                        )
                    )
                    if kept:
                        continue
                    if i in self.plan.resident:
                        self.resident[i] = block
                        slots.free_one()
                        if self.plan.drop_cache and i in self.plan.prepack_resident:
                            # its weights now live in prepacked copies: under a budget, its file
                            # pages would only push out the mapped pages of other kept blocks
                            self.daemon.drop_own_files(spec)
                    else:
                        if self.plan.lag == 0:
                            # unmap now, in this thread: nothing to wait for on the critical path;
                            # the daemon still trims the heap and drops the page cache
                            block.session = None
                            done = slots.free_one
                        else:
                            slots.destroying()
                            done = slots.destroyed
                        self.daemon.release(block, self.plan.drop_cache, self.files_after[i], done)
            except BaseException:  # Ctrl-C or a failure: whoever keeps the traceback keeps this
                # frame; it must not keep a streamed block's session or the activations
                if block is not None and all(b is not block for b in self.resident.values()):
                    block.session = None
                env.clear()
                raise
            finally:
                self._drain(slots)
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
        return {n: env[n] for n in self.manifest.output_names}, stats

    def _drain(self, slots: _Slots) -> None:
        """After a run (or its failure): no load pending, every streamed session destroyed."""
        # Ctrl-C landing just as the inference agent took the slots' lock can leave it held (the
        # interrupt fires between the acquire and the `with` block). Nothing holds it here, so a
        # hold left is such a leak; kept, the daemon's callbacks would wait on it forever (seen:
        # test_ctrl_c_during_a_run hung in 2 of ~14 full runs, the daemon in free_one).
        while slots.cond._is_owned():
            slots.cond.release()
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
            destroy(block, self.model_dir, False, set())
        self.daemon.release_barrier()

    def close(self) -> None:
        self.loaders.shutdown()
        self.daemon.shutdown()
        for block in self.resident.values():
            block.session = None
        self.resident.clear()
        trim_heap()


class FullEngine:
    """One session of the whole model, opened on the first run and kept."""

    def __init__(self, model_dir: Path, manifest: Manifest, plan: Plan):
        # `full` opens the file as users get it; `full-mmap` needs its weights in a data file
        mmap = manifest.full_model_mmap if plan.strategy == "full-mmap" else None
        self.spec = mmap or manifest.full_model
        if self.spec is None:
            raise HermesError(
                f"'{model_dir}' has no whole-model file: strategy '{plan.strategy}' needs one"
            )
        self.model_dir = model_dir
        self.manifest = manifest
        self.plan = plan
        self.settings = SessionSettings(prepack=plan.prepack, optimization="all")
        self.session = None

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], RunStats]:
        names = list(self.manifest.output_names)
        create_s = 0.0
        with _Measure() as m:
            if self.session is None:
                t0 = time.perf_counter()
                paths = [check_file(self.model_dir, f) for f in self.spec.files]
                self.session = create_session(
                    self.model_dir / self.spec.path, self.settings, "the whole model", paths
                )
                create_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            values = run_session(self.session, names, feeds, "the whole model")
            run_s = time.perf_counter() - t1
        stats = RunStats(
            strategy=self.plan.strategy,
            loaders=0,
            window=1,
            latency_s=m.latency_s,
            peak_rss_bytes=m.peak,
            rss_before_bytes=m.rss_before,
            rss_after_bytes=rss_bytes(),
            bytes_read=m.bytes_read,
            max_live_sessions=1,
            blocks=(BlockStats("full", create_s == 0.0, 0.0, 0.0, create_s, run_s),),
        )
        return dict(zip(names, values, strict=True)), stats

    def close(self) -> None:
        self.session = None
        trim_heap()
