"""The session factory: ONNX Runtime sessions with the settings the measurements call for.

- No spinning intra-op pools: with ORT's default spinning pools, parallel loading gives no speedup and
  every live session slows compute 2-5x (DESIGN.md §2). Every strategy uses these same settings.
- Prepacking off for streamed blocks: weights stay file-backed (mmapped from the external data file)
  and a session opens in a few ms; prepacking copies each weight into an anonymous buffer first.
- One shared arena for streamed blocks: a fresh session grows its own arena during its first run
  (fresh pages, ~25 ms a BERT-base layer here); sessions that share the process's arena run their
  first pass as fast as their second, and the activations' memory is reused from block to block.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from hermes_ort.errors import LoadError, RunFailed
from hermes_ort.integrity import check_external_data

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def default_threads() -> int:
    """Cores this process may run on (taskset/affinity respected)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class SessionSettings:
    prepack: bool = True  # ORT's default; False keeps weights file-backed
    optimization: str = "all"  # ORT's default; "disable" for blocks optimised at export
    threads: int = 0  # 0 = default_threads()
    shared_arena: bool = False  # allocate from the process-wide arena instead of a per-session one

    def options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = _LEVELS[self.optimization]
        opts.log_severity_level = 3  # errors only: ORT's warnings are not for end users
        # parse every file as ONNX protobuf (what check_external_data read), never as ORT format
        opts.add_session_config_entry("session.load_model_format", "ONNX")
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if not self.prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        if self.shared_arena:
            register_shared_arena()
            opts.add_session_config_entry("session.use_env_allocators", "1")
        return opts


_arena_lock = threading.Lock()
_arena_registered = False


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
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        except Exception as e:  # registered already by someone else in this process: fine
            if "already" not in str(e).lower():
                raise
        _arena_registered = True


# ORT's default way: prepacking on, its full optimisation level (what users of plain ORT get).
ORT_DEFAULT = SessionSettings(prepack=True, optimization="all")
# The streaming way: blocks were optimised at export (portable level), weights stay mmapped.
STREAMING = SessionSettings(prepack=False, optimization="disable", shared_arena=True)
# Resident blocks worth prepacking. They share the process's arena too: with their own, each holds
# its first run's activations between passes (bert-base, 5 kept blocks: 220.6 -> 209.7 MB).
PREPACKED_STREAMING = SessionSettings(prepack=True, optimization="disable", shared_arena=True)


_created_any = False


def session_created_in_process() -> bool:
    """Whether this process has opened a session yet (the first one costs ORT's warm-up memory)."""
    return _created_any


def create_session(
    path: str | Path, settings: SessionSettings, what: str = "", allowed: list[Path] | None = None
) -> ort.InferenceSession:
    """Open one ONNX file; any ORT failure becomes a LoadError naming the file. Its external data
    must stay inside its model directory (and be among `allowed`, the files the manifest lists
    for it, when given): checked here, before ORT opens anything."""
    path = Path(path)
    label = f"{what} " if what else ""
    if not path.is_file():
        raise LoadError(f"cannot load {label}'{path}': file not found")
    check_external_data(path, allowed)
    global _created_any
    _created_any = True
    try:
        return ort.InferenceSession(
            str(path), settings.options(), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"cannot load {label}'{path}': {first_line}") from e


def run_session(
    session, names: list[str], feeds: dict[str, np.ndarray], what: str
) -> list[np.ndarray]:
    try:
        return session.run(names, feeds)
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


_OUT_OF_MEMORY = ("bad_alloc", "Failed to allocate memory")  # ORT's texts for a failed allocation
