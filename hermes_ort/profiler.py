"""The layer profiler: measures every block on this machine, once, and stores it beside the manifest.

For each block, one at a time, in block order (real inputs flow from block to block):
cold and warm read-ahead time, session creation with and without prepacking, first and steady run
time, the resident bytes of a live session (anonymous and file-backed), and the transient bytes of
a run. The profile is keyed by a fingerprint of the machine, ONNX Runtime and the manifest; it is
reused until one of them changes."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from hermes_ort.daemon import destroy, drop_own_files
from hermes_ort.inputs import sample_inputs
from hermes_ort.integrity import check_size
from hermes_ort.loader import LiveBlock, read_ahead_block
from hermes_ort.manifest import MANIFEST_NAME, Manifest, last_consumers, load_manifest
from hermes_ort.memory import (
    drop_file_cache,
    peak_rss_bytes,
    reset_peak_rss,
    rss_breakdown,
    rss_bytes,
    trim_heap,
)
from hermes_ort.sessions import (
    PREPACKED_STREAMING,
    STREAMING,
    SessionSettings,
    create_session,
    default_threads,
    run_session,
)

PROFILE_NAME = "profile.json"
PROFILE_SCHEMA = 7  # 2: shared arena; 3: cold_read_bytes; 4: engine_overhead_bytes; 5: own files
# read sequentially; 6: prologue read in small folios, kept blocks measured as kept, cold read CPU;
# 7: prepacking's transient
STEADY_RUNS = 3


@dataclass(frozen=True)
class BlockProfile:
    name: str
    file_bytes: int
    cold_read_bytes: (
        int  # bytes the cold read-ahead really read (pages the kernel kept are skipped)
    )
    readahead_cold_s: float  # read with the page cache dropped first (storage speed)
    readahead_cold_cpu_s: float  # CPU time of that read (copies, the kernel's I/O path)
    readahead_warm_s: float
    create_s: float  # prepacking off (weights stay mmapped)
    create_prepack_s: float  # as a kept block is opened (PREPACKED_STREAMING)
    first_run_s: float  # prepacking off, right after read-ahead
    run_s: float  # steady, prepacking off
    run_prepack_s: float  # steady, prepacking on (kept, its file pages dropped)
    live_bytes: int  # RSS of the live session after it has run, prepacking off
    live_anon_bytes: int
    live_file_bytes: int
    live_prepack_bytes: int  # same, prepacking on, as kept (its file pages dropped)
    prepack_transient_bytes: int  # held a moment longer while that session is created
    open_bytes: int  # RSS of the session after creation, before any run (prepacking off)
    transient_bytes: int  # peak above the steady state during a run (intermediates, arena)
    output_bytes: int  # bytes of the tensors the block hands on


@dataclass(frozen=True)
class Profile:
    fingerprint: dict[str, Any]
    batch_size: int
    sequence_length: int
    baseline_bytes: int  # RSS of the profiling process before any block was opened
    warmup_bytes: int  # RSS the first session of a process adds for good (ORT's code, buffers)
    engine_overhead_bytes: int  # a real pipelined pass's peak above the per-block sum (threads,
    # buffers, sessions opened ahead): measured by calibrate() after the blocks
    read_bandwidth_bytes_per_s: float
    blocks: tuple[BlockProfile, ...]
    kept_overhead: float = 0.0  # kept blocks hold this share more than their profiles add up to
    # in a real engine (shared arena, prepacking transients): measured by calibrate()
    first_pass_extra_s: float = 0.0  # a fresh process's first pass beyond the per-block sums
    stream_pass_scale: float = 1.0  # measured / predicted repeated pass that streams blocks
    created: str = ""
    schema_version: int = PROFILE_SCHEMA

    def save(self, model_dir: Path) -> Path:
        path = Path(model_dir) / PROFILE_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        blocks = tuple(BlockProfile(**b) for b in data["blocks"])
        return cls(**{**data, "blocks": blocks})


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu part", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fingerprint(model_dir: Path) -> dict[str, Any]:
    """What a profile depends on: this machine, this ONNX Runtime, this exported model."""
    import hashlib  # lazily: it loads OpenSSL, ~3.5 MB of resident memory

    manifest_hash = hashlib.sha256((Path(model_dir) / MANIFEST_NAME).read_bytes()).hexdigest()
    return {
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cores": default_threads(),
        "onnxruntime": ort.__version__,
        "manifest_sha256": manifest_hash,
    }


def load_profile(model_dir: Path) -> Profile | None:
    """The stored profile if it still matches this machine and model, else None."""
    path = Path(model_dir) / PROFILE_NAME
    try:
        data = json.loads(path.read_text())
        if data.get("schema_version") != PROFILE_SCHEMA or data.get("fingerprint") != fingerprint(
            model_dir
        ):
            return None
        return Profile.from_json(data)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _open(
    model_dir: Path, index: int, manifest: Manifest, settings: SessionSettings
) -> tuple[LiveBlock, float]:
    spec = manifest.blocks[index]
    t0 = time.perf_counter()
    allowed = [check_size(model_dir, f) for f in spec.files]
    session = create_session(model_dir / spec.path, settings, f"block '{spec.name}'", allowed)
    return LiveBlock(index, spec, session), time.perf_counter() - t0


def _timed_runs(block: LiveBlock, feeds: dict[str, np.ndarray], count: int) -> list[float]:
    names = list(block.spec.outputs)
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        run_session(block.session, names, feeds, f"block '{block.spec.name}'")
        times.append(time.perf_counter() - t0)
    return times


def profile_block(
    model_dir: Path, manifest: Manifest, index: int, env: dict[str, np.ndarray]
) -> BlockProfile:
    """Measure one block; adds its outputs to `env`."""
    spec = manifest.blocks[index]
    paths = [check_size(model_dir, f) for f in spec.files]
    feeds = {n: env[n] for n in spec.inputs}
    for p in paths:
        drop_file_cache(str(p))
    t0, cpu0 = time.perf_counter(), time.thread_time()
    nbytes = sum(os.path.getsize(p) for p in paths)
    cold_read = read_ahead_block(spec, paths)  # as the loading agents read it
    cold, cold_cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    t0 = time.perf_counter()
    read_ahead_block(spec, paths)
    warm = time.perf_counter() - t0

    trim_heap()
    rss0, parts0 = rss_bytes(), rss_breakdown()
    block, create_s = _open(model_dir, index, manifest, STREAMING)
    open_bytes = rss_bytes() - rss0
    reset_peak_rss()
    t0 = time.perf_counter()
    outputs = run_session(block.session, list(spec.outputs), feeds, f"block '{spec.name}'")
    first = time.perf_counter() - t0
    peak = peak_rss_bytes()
    out_bytes = sum(o.nbytes for o in outputs)
    after = rss_bytes()
    parts = {k: v - parts0[k] for k, v in rss_breakdown().items()}
    steady = statistics.median(_timed_runs(block, feeds, STEADY_RUNS))
    env.update(zip(spec.outputs, outputs, strict=True))
    live = max(0, after - rss0 - out_bytes)
    transient = max(0, peak - after)
    destroy(block, model_dir, False, set())

    # kept and prepacked, as the engine keeps it: its own files' pages dropped after its first run
    trim_heap()
    rss0 = rss_bytes()
    reset_peak_rss()
    block, create_prepack_s = _open(model_dir, index, manifest, PREPACKED_STREAMING)
    packing = max(0, peak_rss_bytes() - rss_bytes())
    _timed_runs(block, feeds, 1)
    drop_own_files(spec, model_dir)
    run_prepack = statistics.median(_timed_runs(block, feeds, STEADY_RUNS))
    live_prepack = max(0, rss_bytes() - rss0)
    destroy(block, model_dir, False, set())
    return BlockProfile(
        name=spec.name,
        file_bytes=nbytes,
        cold_read_bytes=cold_read,
        readahead_cold_s=cold,
        readahead_cold_cpu_s=cold_cpu,
        readahead_warm_s=warm,
        create_s=create_s,
        create_prepack_s=create_prepack_s,
        first_run_s=first,
        run_s=steady,
        run_prepack_s=run_prepack,
        live_bytes=live,
        live_anon_bytes=max(0, parts["anon"] - out_bytes),
        live_file_bytes=max(0, parts["file"]),
        live_prepack_bytes=live_prepack,
        prepack_transient_bytes=packing,
        open_bytes=max(0, open_bytes),
        transient_bytes=transient,
        output_bytes=out_bytes,
    )


def profile_model(
    model_dir: str | Path, sequence_length: int | None = None, progress=None
) -> Profile:
    """Measure every block of an exported model on this machine (a few seconds for bert-base)."""
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    feeds = sample_inputs(manifest, 1, sequence_length)
    seq = next((v.shape[1] for v in feeds.values() if v.ndim >= 2), 1)
    # warm-up: the first session of a process faults in ONNX Runtime's own code and buffers
    trim_heap()
    cold_rss = rss_bytes()
    warm, _ = _open(model_dir, 0, manifest, STREAMING)
    run_session(
        warm.session,
        list(manifest.blocks[0].outputs),
        {n: feeds[n] for n in manifest.blocks[0].inputs},
        "warm-up",
    )
    destroy(warm, model_dir, False, set())
    trim_heap()
    baseline = rss_bytes()
    env = dict(feeds)
    last = last_consumers(manifest)
    blocks = []
    for i in range(len(manifest.blocks)):
        blocks.append(profile_block(model_dir, manifest, i, env))
        for name in [n for n in env if last.get(n, -1) <= i and n not in manifest.output_names]:
            del env[name]
        if progress:
            progress(i + 1, len(manifest.blocks), blocks[-1])
    measured = [b for b in blocks if b.cold_read_bytes >= 1 << 20] or blocks  # tiny reads: syscalls
    read = sum(b.cold_read_bytes for b in measured)
    cold = sum(b.readahead_cold_s for b in measured)
    return Profile(
        fingerprint=fingerprint(model_dir),
        batch_size=1,
        sequence_length=seq,
        baseline_bytes=baseline,
        warmup_bytes=max(0, baseline - cold_rss),
        engine_overhead_bytes=0,
        read_bandwidth_bytes_per_s=read / cold if cold > 0 else 0.0,
        blocks=tuple(blocks),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )


def ensure_profile(model_dir: str | Path, progress=None) -> Profile:
    """The stored profile, or a new one measured now and saved beside the manifest."""
    model_dir = Path(model_dir)
    profile = load_profile(model_dir)
    if profile is None:
        from hermes_ort.calibrate import calibrate  # the engine, planner: imported late (cycles)

        profile = profile_model(model_dir, progress=progress)
        try:
            profile = calibrate(model_dir, profile)  # stores it, measures in a fresh process
            profile.save(model_dir)
        except OSError:  # a read-only model directory: use it uncalibrated and unsaved
            pass
    return profile
