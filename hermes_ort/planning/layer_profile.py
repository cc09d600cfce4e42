"""A model's layer profile as data: what the profiler measured of every block on this machine and
what calibration added, stored as `profile.json` beside the manifest (JSON, schema versioned).

It is keyed by a fingerprint of the machine, ONNX Runtime and the manifest, and reused until one
of them changes. Sizes in bytes, times in seconds."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from hermes_ort.core.machine import cpu_name, default_threads
from hermes_ort.core.manifest import MANIFEST_NAME

PROFILE_NAME = "profile.json"
# 2: shared arena; 3: cold_read_bytes; 4: engine_overhead_bytes; 5: own files read sequentially;
# 6: prologue read in small folios, kept blocks measured as kept, cold read CPU; 7: prepacking's
# transient; 8: activations probed at several shapes (activation_model.py); 9: paged blocks
PROFILE_SCHEMA = 9


@dataclass(frozen=True)
class BlockProfile:
    name: str
    file_bytes: int
    # bytes the cold read-ahead really read (pages the kernel kept are skipped)
    cold_read_bytes: int
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
    # (rows, positions, transient bytes) of runs at several shapes, shrunk arena between them:
    # what the activation fit is made from
    activation_points: tuple[tuple[int, int, int], ...] = ()
    # (rows, positions, predicted from the other points, measured): how well the fit predicts a
    # shape it was not made from
    activation_check: tuple[int, int, int, int] | None = None
    # paged (streaming/paged.py), where it streams prepacked; 0: not measured (not paged)
    paged_anon_bytes: int = 0  # anonymous bytes its open session keeps once its pages dropped
    paged_bytes: int = 0  # its packed copies: what a prefetch maps
    paged_open_bytes: int = 0  # peak RSS added while its paged session was opened
    paged_open_s: float = 0.0  # opening it (its packed copy saved already)
    prefetch_warm_s: float = 0.0  # its packed copies faulted in from the page cache


@dataclass(frozen=True)
class Profile:
    fingerprint: dict[str, Any]
    batch_size: int
    sequence_length: int
    baseline_bytes: int  # RSS of the profiling process before any block was opened
    warmup_bytes: int  # RSS the first session of a process adds for good (ORT's code, buffers)
    # a real pipelined pass's peak above the per-block sum (threads, buffers, sessions opened
    # ahead): measured by calibration after the blocks
    engine_overhead_bytes: int
    read_bandwidth_bytes_per_s: float
    blocks: tuple[BlockProfile, ...]
    # kept blocks hold this share more than their profiles add up to in a real engine (shared
    # arena, prepacking transients): measured by calibration
    kept_overhead: float = 0.0
    first_pass_extra_s: float = 0.0  # a fresh process's first pass beyond the per-block sums
    stream_pass_scale: float = 1.0  # measured / predicted repeated pass that streams blocks
    created: str = ""
    schema_version: int = PROFILE_SCHEMA

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / PROFILE_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        blocks = tuple(
            BlockProfile(
                **{
                    **b,
                    "activation_points": tuple(tuple(x) for x in b.get("activation_points", ())),
                    "activation_check": tuple(b["activation_check"])
                    if b.get("activation_check")
                    else None,
                }
            )
            for b in data["blocks"]
        )
        return cls(**{**data, "blocks": blocks})


def fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """What a profile depends on: this machine, this ONNX Runtime, this exported model."""
    import hashlib  # lazily: it loads OpenSSL, ~3.5 MB of resident memory

    manifest_hash = hashlib.sha256((Path(model_dir) / MANIFEST_NAME).read_bytes()).hexdigest()
    return {
        "machine": os.uname().machine,
        "cpu": cpu_name(),
        "cores": default_threads(),
        "onnxruntime": metadata.version("onnxruntime"),
        "manifest_sha256": manifest_hash,
    }


def read_profile(model_dir: str | Path) -> Profile | None:
    """The stored profile if it still matches this machine and model, else None."""
    path = Path(model_dir) / PROFILE_NAME
    try:
        data = json.loads(path.read_text())
        if data.get("schema_version") != PROFILE_SCHEMA:
            return None
        if data.get("fingerprint") != fingerprint(model_dir):
            return None
        return Profile.from_json(data)
    except (OSError, ValueError, TypeError, KeyError):
        return None
