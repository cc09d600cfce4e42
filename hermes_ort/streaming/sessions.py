"""The session factory: ONNX Runtime sessions opened as SessionSettings (settings.py) say, with the
settings every strategy shares, and ORT's failures turned into errors that name the block.

No spinning intra-op pools: with ORT's default spinning pools, a block that runs right after others
ran waits for their spinning threads (docs/design.md §2.2)."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from hermes_ort.core.errors import LoadError, RunFailed
from hermes_ort.core.machine import default_threads
from hermes_ort.core.settings import SessionSettings
from hermes_ort.streaming.integrity import Verifier, check_external_data

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(settings: SessionSettings) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _LEVELS[settings.optimization]
    opts.log_severity_level = 3  # errors only: ORT's warnings are not for end users
    # parse every file as ONNX protobuf (what the integrity check read), never as ORT format
    opts.add_session_config_entry("session.load_model_format", "ONNX")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if not settings.prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if settings.shared_arena:
        register_shared_arena()
        opts.add_session_config_entry("session.use_env_allocators", "1")
    return opts


# The shared arena grows by what is asked (kSameAsRequested), not to the next power of two: its
# size then follows the activations the cost model predicts instead of overshooting them by up
# to 2x (a tiny bert's 16-row micro-batch: 25 MB over a 103 MB budget with powers of two).
ARENA_SAME_AS_REQUESTED = 1

_arena_lock = threading.Lock()
_arena_registered = False
_created_any = False  # the process's first session faults in ORT's code and buffers


def register_shared_arena() -> None:
    """Register, once per process, the CPU arena that shared-arena sessions allocate from."""
    global _arena_registered
    with _arena_lock:
        if _arena_registered:
            return
        info = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        try:
            ort.create_and_register_allocator(
                info, ort.OrtArenaCfg(0, ARENA_SAME_AS_REQUESTED, -1, -1)
            )
        except Exception as e:  # registered already by someone else in this process: fine
            if "already" not in str(e).lower():
                raise
        _arena_registered = True


def warmup_pending() -> bool:
    """True until this process opens its first session (which costs ORT's warm-up memory): the
    cost model is told so explicitly by whoever plans."""
    return not _created_any


def create_session(
    path: str | Path,
    settings: SessionSettings,
    what: str = "",
    allowed: list[Path] | None = None,
    verifier: Verifier | None = None,
) -> ort.InferenceSession:
    """Open one ONNX file; any ORT failure becomes a LoadError naming the file. Its external data
    must stay inside its model directory (and be among `allowed`, the files the manifest lists
    for it, when given): checked here, before ORT opens anything (cached by `verifier`)."""
    path = Path(path)
    label = f"{what} " if what else ""
    if not path.is_file():
        raise LoadError(f"cannot load {label}'{path}': file not found")
    if verifier is not None:
        verifier.check_graph(path, allowed)
    else:
        check_external_data(path, allowed)
    global _created_any
    _created_any = True
    try:
        return ort.InferenceSession(
            str(path), session_options(settings), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"cannot load {label}'{path}': {first_line}") from e


_OUT_OF_MEMORY = ("bad_alloc", "Failed to allocate memory")  # ORT's texts for a failed allocation


@functools.cache
def shrinking_run_options() -> ort.RunOptions:
    """Run options that give the shared arena's free regions back to the system after the run
    (made once: read-only after)."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def run_session(
    session, names: list[str], feeds: dict[str, np.ndarray], what: str, shrink: bool = False
) -> list[np.ndarray]:
    """`shrink`: the shared arena shrunk after this run (the last block of a budgeted pass:
    passes of growing shapes, a chunked prefill's, would otherwise leave the arena fragmented
    and growing, 0.2 -> 0.9 GB over gpt2's 32 chunks of 16 positions)."""
    try:
        return session.run(names, feeds, shrinking_run_options() if shrink else None)
    except BaseException as e:  # ORT's own exception types, or Ctrl-C as ORT's run returns
        # whoever keeps the error (a REPL keeps the last one) must not keep the session: drop this
        # frame's reference and the frames below (ORT's wrapper, whose `self` is the session)
        del session
        e = e.with_traceback(None)
        if not isinstance(e, Exception):
            raise e  # noqa: B904  (re-raised as it is, only without ORT's frames)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if any(s in first for s in _OUT_OF_MEMORY):
            raise RunFailed(f"{what} ran out of memory (a memory limit was hit): {first}") from e
        raise RunFailed(f"{what} failed to run: {first}") from e
