"""The daemon agent: destroys executed sessions and gives their memory back.

Destroying a session unmaps its weights; glibc still keeps the freed heap until malloc_trim; the
page cache keeps the file pages unless told to drop them. All three happen here, off the inference
agent's critical path, and only then is the block's window slot handed back. A paged block's
session stays open: its packed copies' pages are dropped instead (paged.py)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from hermes_ort.core.trace import Trace
from hermes_ort.streaming.loader import LiveBlock, drop_own_files  # noqa: F401  (re-exported)
from hermes_ort.streaming.memory import drop_file_cache, trim_heap


def destroy(block: LiveBlock, model_dir: Path, drop_cache: bool, keep_cached: set[str]) -> None:
    """Free one block: session, heap, and (if asked) the page cache of files no one needs soon."""
    block.session = None
    gc.collect(0)  # the session may sit in a reference cycle of a traceback
    trim_heap()
    if drop_cache:
        for f in block.spec.files:
            if f.path not in keep_cached:
                drop_file_cache(str(model_dir / f.path))


class Daemon:
    """One background thread; `release` queues a block for destruction and calls `done` after."""

    def __init__(self, model_dir: Path, trace: Trace | None = None):
        self.model_dir = model_dir
        self.trace = trace
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hermes-daemon")

    def release(
        self, block: LiveBlock, drop_cache: bool, keep_cached: set[str], done: Callable[[], None]
    ) -> Future:
        def work() -> None:
            t0 = time.perf_counter()
            try:
                destroy(block, self.model_dir, drop_cache, keep_cached)
            finally:
                if self.trace is not None:
                    self.trace.add(block.spec.name, "free", t0)
                done()

        return self._pool.submit(work)

    def drop_paged(self, block: LiveBlock, drop_cache: bool, done: Callable[[], None]) -> Future:
        """Queue dropping an executed paged block's pages (`drop_cache`: and its saved copy's
        page cache) and call `done` after."""
        paged, block.session = block.paged, None  # the PagedSession keeps the session

        def work() -> None:
            t0 = time.perf_counter()
            try:
                paged.drop(drop_cache)
            finally:
                if self.trace is not None:
                    self.trace.add(block.spec.name, "free", t0)
                done()

        return self._pool.submit(work)

    def release_barrier(self) -> None:
        """Wait until every queued release has finished."""
        self._pool.submit(lambda: None).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
