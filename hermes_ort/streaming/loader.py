"""Loading agents: a thread pool that opens the sessions of upcoming blocks in parallel.

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
from hermes_ort.streaming.readahead import read_ahead
from hermes_ort.streaming.sessions import create_session


@dataclass
class LiveBlock:
    """A block whose session is open. Mutable only in `session`, which the daemon drops."""

    index: int
    spec: BlockSpec
    session: ort.InferenceSession | None
    readahead_s: float = 0.0
    create_s: float = 0.0
    bytes_read_ahead: int = 0


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
    names = {i.name for i in session.get_inputs()}
    if not names <= set(spec.inputs):
        del session  # not kept alive by the traceback's frame
        raise LoadError(
            f"block '{spec.name}' ('{spec.path}') takes inputs {sorted(names - set(spec.inputs))} "
            "that its manifest entry does not list"
        )
    return LiveBlock(
        index, spec, session, readahead_s=t1 - t0, create_s=t2 - t1, bytes_read_ahead=read
    )


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

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
