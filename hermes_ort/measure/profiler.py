"""The layer profiler: measures every block on this machine, once (planning/layer_profile.py
holds the result).

For each block, one at a time, in block order (real inputs flow from block to block):
cold and warm read-ahead time, session creation with and without prepacking, first and steady run
time, the resident bytes of a live session (anonymous and file-backed), and the transient bytes of
a run; where the block streams prepacked, the same of it paged (streaming/paged.py: opening, what
it keeps, its packed copies and their prefetch), its copy saved in the packed-copy cache.
`costs_now` turns a profile (or, without one, the files' sizes) into the cost model the planner
uses, as this process sees its memory and the page cache now."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from hermes_ort.core.choices import VerifyMode
from hermes_ort.core.manifest import BlockSpec, Manifest, load_manifest
from hermes_ort.core.settings import PREPACKED_STREAMING, STREAMING, SessionSettings
from hermes_ort.measure.activation_probe import probe_activations
from hermes_ort.planning.cost_model import CostModel, streams_prepacked
from hermes_ort.planning.layer_profile import BlockProfile, Profile, fingerprint
from hermes_ort.streaming.daemon import destroy, drop_own_files
from hermes_ort.streaming.integrity import Verifier, check_size
from hermes_ort.streaming.loader import LiveBlock, read_ahead_block
from hermes_ort.streaming.memory import (
    drop_file_cache,
    peak_rss_bytes,
    reset_peak_rss,
    rss_breakdown,
    rss_bytes,
    trim_heap,
)
from hermes_ort.streaming.packed_copies import PackedCopyError, default_cache_dir, save_packed
from hermes_ort.streaming.paged import PagedSession, paging_problem
from hermes_ort.streaming.readahead import is_cached
from hermes_ort.streaming.sessions import create_session, run_session, warmup_pending
from hermes_ort.tensors.dataflow import Tensors
from hermes_ort.tensors.inputs import sample_inputs

STEADY_RUNS = 3


def _open(
    verifier: Verifier, index: int, manifest: Manifest, settings: SessionSettings
) -> tuple[LiveBlock, float]:
    spec = manifest.blocks[index]
    t0 = time.perf_counter()
    allowed = [verifier.check(f) for f in spec.files]
    path = verifier.model_dir / spec.path
    session = create_session(path, settings, f"block '{spec.name}'", allowed, verifier)
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
    verifier: Verifier,
    manifest: Manifest,
    index: int,
    tensors: Tensors,
    paged_cache: Path | None = None,
) -> BlockProfile:
    """Measure one block; puts its outputs into `tensors`. `paged_cache`: where its packed copy
    is saved to measure it paged, if it streams prepacked (None: not measured paged)."""
    model_dir = verifier.model_dir
    spec = manifest.blocks[index]
    paths = [check_size(model_dir, f) for f in spec.files]
    feeds = tensors.inputs_of(index)
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
    block, create_s = _open(verifier, index, manifest, STREAMING)
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
    tensors.put(index, outputs)
    live = max(0, after - rss0 - out_bytes)
    transient = max(0, peak - after)
    destroy(block, model_dir, False, set())

    # kept and prepacked, as the engine keeps it: its own files' pages dropped after its first run
    trim_heap()
    rss0 = rss_bytes()
    reset_peak_rss()
    block, create_prepack_s = _open(verifier, index, manifest, PREPACKED_STREAMING)
    packing = max(0, peak_rss_bytes() - rss_bytes())
    _timed_runs(block, feeds, 1)
    drop_own_files(spec, model_dir)
    run_prepack = statistics.median(_timed_runs(block, feeds, STEADY_RUNS))
    live_prepack = max(0, rss_bytes() - rss0)
    destroy(block, model_dir, False, set())
    measured = BlockProfile(
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
    if paged_cache is None or not streams_prepacked(measured, spec.kind):
        return measured
    return replace(measured, **profile_paged(model_dir, spec, feeds, paged_cache))


def profile_paged(
    model_dir: Path, spec: BlockSpec, feeds: dict[str, np.ndarray], cache: Path
) -> dict[str, Any]:
    """BlockProfile's paged fields of one block (none where it cannot be paged): its copy saved
    into `cache` first (unless there), then opened as the engine opens it."""
    try:
        saved = save_packed(model_dir / spec.path, cache, settings=PREPACKED_STREAMING)
    except (PackedCopyError, OSError):
        return {}
    trim_heap()
    rss0, anon0 = rss_bytes(), rss_breakdown()["anon"]
    reset_peak_rss()
    t0 = time.perf_counter()
    try:
        block = PagedSession(saved, verify=VerifyMode.SIZE, what=f"block '{spec.name}'")
    except PackedCopyError:
        return {}
    open_s = time.perf_counter() - t0
    hold = max(0, peak_rss_bytes() - rss0)
    outputs = block.run(list(spec.outputs), feeds)  # what a run allocates for good stays
    del outputs
    block.drop()
    trim_heap()
    anon = max(0, rss_breakdown()["anon"] - anon0)
    prefetch = []
    for _ in range(STEADY_RUNS):
        block.drop()
        t0 = time.perf_counter()
        block.prefetch()
        prefetch.append(time.perf_counter() - t0)
    packed = block.dense_bytes
    block.close()
    trim_heap()
    return dict(
        paged_anon_bytes=anon,
        paged_bytes=packed,
        paged_open_bytes=hold,
        paged_open_s=open_s,
        prefetch_warm_s=statistics.median(prefetch),
    )


def profile_model(
    model_dir: str | Path, sequence_length: int | None = None, progress=None
) -> Profile:
    """Measure every block of an exported model on this machine (a few seconds for bert-base)."""
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    verifier = Verifier(model_dir, "size")  # sizes and external data: the profile measures, the
    # model's first load verifies its hashes
    feeds = sample_inputs(manifest, 1, sequence_length)
    seq = next((v.shape[1] for v in feeds.values() if v.ndim >= 2), 1)
    # warm-up: the first session of a process faults in ONNX Runtime's own code and buffers
    trim_heap()
    cold_rss = rss_bytes()
    warm, _ = _open(verifier, 0, manifest, STREAMING)
    run_session(
        warm.session,
        list(manifest.blocks[0].outputs),
        {n: feeds[n] for n in manifest.blocks[0].inputs},
        "warm-up",
    )
    destroy(warm, model_dir, False, set())
    trim_heap()
    baseline = rss_bytes()
    tensors = Tensors(manifest, feeds)
    # paged blocks' copies are saved where the engine will open them (the first load then
    # saves none); no cache to write: measured unpaged, and planned so
    cache = None if paging_problem() else default_cache_dir()
    blocks = []
    for i in range(len(manifest.blocks)):
        blocks.append(profile_block(verifier, manifest, i, tensors, cache))
        if progress:
            progress(i + 1, len(manifest.blocks), blocks[-1])
    blocks = probe_activations(verifier, manifest, seq, blocks)
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


def baseline_now() -> int:
    """The process baseline a plan is made with: its resident set now."""
    return rss_bytes()


def costs_now(
    model_dir: Path,
    manifest: Manifest,
    profile: Profile | None,
    cold: bool,
    baseline_bytes: int | None = None,
) -> CostModel:
    """The cost model a plan is made with now: measured costs from `profile`, else estimates from
    file sizes; this process's RSS (or `baseline_bytes`) as the baseline, whether it has yet to
    pay ONNX Runtime's warm-up, and which blocks' files the page cache holds (the first pass
    reads those from it)."""
    pending = warmup_pending()
    baseline = rss_bytes() if baseline_bytes is None else baseline_bytes
    if profile is None:
        return CostModel.estimate(manifest, baseline, pending)
    cached = cached_now(model_dir, manifest)
    return CostModel.from_profile(manifest, profile, baseline, cold, cached, pending)


def cached_now(model_dir: Path, manifest: Manifest) -> tuple[bool, ...] | None:
    """Per block: are its files in the page cache now (the first pass reads them from there)?"""
    state = {p: is_cached(str(model_dir / p)) for p in manifest.block_files()}
    if None in state.values():
        return None
    return tuple(all(state[f.path] for f in b.files) for b in manifest.blocks)
