"""Loading agents: a thread pool that opens the sessions of upcoming blocks in parallel, or, for a
paged block whose session stays open, prefetches its packed copies' pages (paged.py).

ORT's session construction and file reads both release the GIL: k agents load k blocks at once."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from hermes_ort.core.choices import BlockKind
from hermes_ort.core.errors import HermesError, LoadError
from hermes_ort.core.manifest import BlockSpec
from hermes_ort.core.settings import SessionSettings
from hermes_ort.core.trace import Trace
from hermes_ort.streaming.integrity import Verifier
from hermes_ort.streaming.memory import drop_file_cache
from hermes_ort.streaming.packed_copies import save_packed
from hermes_ort.streaming.paged import PagedSession
from hermes_ort.streaming.readahead import read_ahead
from hermes_ort.streaming.sessions import create_session


@dataclass
class LiveBlock:
    """A block whose session is open. Mutable only in `session`, which the daemon drops."""

    index: int
    spec: BlockSpec
    session: ort.InferenceSession | None
    readahead_s: float = 0.0  # a paged block's: its prefetch
    create_s: float = 0.0
    bytes_read_ahead: int = 0
    paged: PagedSession | None = None  # a paged block's session, which outlives this pass


def drop_own_files(spec: BlockSpec, model_dir: Path) -> None:
    """Drop the page cache of the block's own files (not shared ones): a prepacked block's
    weights live in its packed copies."""
    for f in spec.files:
        if spec.is_own(f):
            drop_file_cache(str(model_dir / f.path))


def read_ahead_block(spec: BlockSpec, paths: list[Path]) -> int:
    """Read a block's files into the page cache; bytes read. A layer's own files sequentially;
    shared files and the prologue's (embedding tables, looked up a few rows at a time) in small
    folios, or a lookup maps whole large ones (docs/design.md §2.4)."""
    return sum(
        read_ahead(str(p), sequential=spec.is_own(f) and spec.kind != BlockKind.PROLOGUE)
        for f, p in zip(spec.files, paths, strict=True)
    )


def load_block(
    verifier: Verifier, index: int, spec: BlockSpec, settings: SessionSettings, readahead: bool
) -> LiveBlock:
    """Check, optionally read ahead, and open one block; LoadError/IntegrityError name it."""
    model_dir = verifier.model_dir
    paths = [verifier.check(f) for f in spec.files]
    t0 = time.perf_counter()
    read = 0
    if readahead:
        try:
            read = read_ahead_block(spec, paths)
        except OSError as e:
            raise LoadError(f"block '{spec.name}': cannot read '{e.filename}': {e.strerror}") from e
    t1 = time.perf_counter()
    session = create_session(
        model_dir / spec.path, settings, f"block '{spec.name}'", paths, verifier
    )
    t2 = time.perf_counter()
    error = _inputs_error(spec, session)
    if error is not None:
        del session  # not kept alive by the traceback's frame
        raise error
    return LiveBlock(
        index, spec, session, readahead_s=t1 - t0, create_s=t2 - t1, bytes_read_ahead=read
    )


def _inputs_error(spec: BlockSpec, session: ort.InferenceSession) -> LoadError | None:
    """The error of a session taking inputs the block's manifest entry does not list (made, not
    raised here: the raising frame must not hold the session)."""
    names = {i.name for i in session.get_inputs()}
    if names <= set(spec.inputs):
        return None
    return LoadError(
        f"block '{spec.name}' ('{spec.path}') takes inputs {sorted(names - set(spec.inputs))} "
        "that its manifest entry does not list"
    )


def open_paged_block(
    verifier: Verifier, spec: BlockSpec, settings: SessionSettings, cache_dir: Path | None = None
) -> PagedSession:
    """Check a block's files as `load_block` does, save its packed copy into the cache unless it
    is there (cache_dir None: packed_copies.default_cache_dir), open it paged and drop its
    pages. IntegrityError/LoadError as `load_block`; PackedCopyError (or OSError: a full disk)
    where it cannot be paged."""
    paths = [verifier.check(f) for f in spec.files]
    graph = verifier.model_dir / spec.path
    verifier.check_graph(graph, paths)  # save_packed opens it with ORT: confined first
    known = {Path(f.path).name: f.sha256 for f in spec.files if f.sha256}
    saved = save_packed(graph, cache_dir, settings.threads, settings, known)
    what = f"block '{spec.name}'"
    paged = PagedSession(saved, settings.threads, verifier.mode, settings, what)
    error = _inputs_error(spec, paged.session)
    if error is not None:
        paged.close()
        raise error
    paged.drop()
    return paged


class LoadingAgents:
    """k loading agents. `submit` returns a Future of a LiveBlock."""

    def __init__(self, verifier: Verifier, agents: int, trace: Trace | None = None):
        self.verifier = verifier
        self.trace = trace
        self.agents = agents
        self._pool = ThreadPoolExecutor(max_workers=agents, thread_name_prefix="hermes-loader")

    def submit(
        self,
        index: int,
        spec: BlockSpec,
        settings: SessionSettings,
        readahead: bool,
        drop_packed_pages: bool = False,
    ) -> Future:
        """Load block `index`; `drop_packed_pages`: once its session is created prepacked, drop
        its own files' pages (its weights now live in the packed copies; under a memory cgroup
        those pages would take the room the next block's read-ahead needs)."""
        return self._pool.submit(self._load, index, spec, settings, readahead, drop_packed_pages)

    def _load(
        self,
        index: int,
        spec: BlockSpec,
        settings: SessionSettings,
        readahead: bool,
        drop_packed_pages: bool = False,
    ) -> LiveBlock:
        try:
            block = load_block(self.verifier, index, spec, settings, readahead)
        except HermesError:
            raise
        except Exception as e:  # anything else: still name the block
            raise LoadError(f"block '{spec.name}': {type(e).__name__}: {e}") from e
        if self.trace is not None:  # spans from its timings
            end = time.perf_counter()
            created = end - block.create_s
            if readahead:
                self.trace.add(spec.name, "read", created - block.readahead_s, created)
            self.trace.add(spec.name, "create", created, end)
        if drop_packed_pages and settings.prepack:
            drop_own_files(spec, self.verifier.model_dir)
        return block

    def prefetch(self, index: int, spec: BlockSpec, paged: PagedSession) -> Future:
        """A paged block's load: its packed copies' pages faulted in (from the page cache, or
        storage) before its run; a Future of a LiveBlock on its open session."""
        return self._pool.submit(self._prefetch, index, spec, paged)

    def _prefetch(self, index: int, spec: BlockSpec, paged: PagedSession) -> LiveBlock:
        t0 = time.perf_counter()
        paged.prefetch()
        t1 = time.perf_counter()
        if self.trace is not None:
            self.trace.add(spec.name, "read", t0, t1)
        return LiveBlock(index, spec, paged.session, readahead_s=t1 - t0, paged=paged)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
