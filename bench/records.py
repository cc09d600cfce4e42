"""Bench records: one Sample per fresh process, one Record per configuration (medians beside the
raw samples, the floors, the ratios to `full` and `pipeswitch`), and the JSON document of a run.

Floors (docs/design.md §4):
- compute floor: every block's session created and warm, the runs alone: the median steady
  `compute_s` (sum of the blocks' run times) of `pipeswitch` on the same model and cores;
- I/O floor of the first pass: the bytes the strategy must read (its files, when the profile
  evicts them; nothing when warm) / the storage profile's measured read bandwidth;
- I/O floor of a steady pass under a limit L (the memory cap, or pipeload's budget if lower) on
  cold storage: the part of the model that cannot stay resident, model - (L - baseline RSS)."""

from __future__ import annotations

import gzip
import json
import os
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hermes_ort.measure.fresh_process import ChildResult

SCHEMA_VERSION = 1
KIND = "hermes-ort-bench"


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


@dataclass(frozen=True)
class Sample:
    """One fresh process of one configuration."""

    repeat: int
    ok: bool
    returncode: int
    error: str | None
    oom_killed: bool  # the memory cgroup's OOM killer ended it
    wall_s: float  # spawn to exit, seen by the parent
    one_shot_s: float | None  # process start to the first outputs, loading included
    first_pass_s: float | None  # the first run() call alone
    steady_s: tuple[float, ...] = ()  # later passes
    steady_compute_s: tuple[float, ...] = ()  # their blocks' run times alone
    peak_rss_bytes: int | None = None  # the process's peak resident set (VmHWM / sampled)
    cgroup_peak_bytes: int | None = None  # its memory cgroup's peak: RSS + page cache charged
    cgroup_failcnt: int | None = None
    read_bytes: int | None = None  # the process's reads from storage (page-cache hits excluded)
    blkio_read_bytes: int | None = None  # its blkio group's reads from the model's disk
    baseline_rss_bytes: int | None = None  # RSS before the first pass (Python + ORT)
    budget_bytes: int | None = None  # as the child resolved it
    detail: dict[str, Any] = field(default_factory=dict)  # the child's other fields (plan, ...)
    rss_curve: tuple[tuple[float, int], ...] = ()  # (s since process start, RSS bytes)

    @property
    def steady_median_s(self) -> float | None:
        return median(self.steady_s)


_SAMPLE_KEYS = (
    "one_shot_s",
    "first_pass_s",
    "peak_rss_bytes",
    "read_bytes",
    "baseline_rss_bytes",
    "budget_bytes",
)


def sample_from_child(
    repeat: int,
    result: ChildResult,
    memory=None,
    blkio_read_bytes: int | None = None,
    cap_enforced: bool = False,
) -> Sample:
    """A Sample from a child's result (its JSON record may be empty) and its groups' stats."""
    child = result.record
    oom = bool(memory and memory.oom_kills) or (cap_enforced and result.returncode == -9)
    ok = result.ok and child.get("ok") is True
    error = None
    if not ok:
        error = child.get("error") or ("killed by the memory cap (OOM)" if oom else result.error)
    skip = (*_SAMPLE_KEYS, "ok", "error", "steady_s", "steady_compute_s", "rss_curve")
    rest = {k: v for k, v in child.items() if k not in skip}
    return Sample(
        repeat=repeat,
        ok=ok,
        returncode=result.returncode,
        error=error,
        oom_killed=oom,
        wall_s=result.wall_s,
        **{k: child.get(k) for k in _SAMPLE_KEYS},
        steady_s=tuple(child.get("steady_s", ())),
        steady_compute_s=tuple(child.get("steady_compute_s", ())),
        cgroup_peak_bytes=memory.peak_bytes if memory else None,
        cgroup_failcnt=memory.failcnt if memory else None,
        blkio_read_bytes=blkio_read_bytes,
        detail=rest,
        rss_curve=tuple(tuple(p) for p in child.get("rss_curve", ())),
    )


@dataclass(frozen=True)
class Floors:
    compute_s: float | None
    io_first_bytes: int
    io_first_s: float | None
    io_steady_bytes: int
    io_steady_s: float | None


def io_floors(
    cold: bool,
    strategy_bytes: int,
    model_bytes: int,
    limit_bytes: int | None,
    baseline_bytes: int | None,
) -> tuple[int, int]:
    """(bytes a first pass must read, bytes a steady pass must read) (see the module docstring)."""
    if not cold:
        return 0, 0
    steady = 0
    if limit_bytes is not None:
        usable = max(0, limit_bytes - (baseline_bytes or 0))
        steady = max(0, model_bytes - usable)
    return strategy_bytes, steady


def seconds(nbytes: int, bandwidth: float | None) -> float | None:
    if nbytes == 0:
        return 0.0
    return nbytes / bandwidth if bandwidth else None


@dataclass(frozen=True)
class Record:
    """One configuration: what was asked, what was in force, medians over its processes."""

    model: str
    label: str  # strategy as in the matrix, e.g. "pipeswitch+stream"
    strategy: str  # the runtime strategy
    load_path: str
    budget: str | None  # as written ("min", "150MB", ...); None: no budget option (baselines)
    budget_bytes: int | None  # as the child resolved it (median)
    profile: str
    storage: str
    cache: str
    cores: int | None
    memory_cap_bytes: int | None
    read_limit_bytes_per_s: int | None
    cap_enforced: bool
    throttle_enforced: bool
    repeats: int
    ok_repeats: int
    killed_repeats: int  # by the memory cap
    error: str | None  # the first failure, if any
    one_shot_s: float | None
    startup_s: float | None  # of which: the interpreter and ONNX Runtime starting (imports)
    first_pass_s: float | None
    steady_s: float | None  # median over processes of each process's median steady pass
    peak_rss_bytes: int | None
    cgroup_peak_bytes: int | None
    read_bytes: int | None
    compute_floor_s: float | None
    io_floor_bytes: int
    io_floor_s: float | None
    steady_io_floor_bytes: int
    steady_io_floor_s: float | None
    cap_from_budget: bool = False  # the cap is the budget plus a margin (--cap-at-budget)
    vs_full: dict[str, float] | None = None
    vs_pipeswitch: dict[str, float] | None = None
    samples: tuple[Sample, ...] = ()

    @property
    def group(self) -> tuple[str, str]:
        return self.model, self.profile


def aggregate(config_fields: dict[str, Any], samples: list[Sample], floors: Floors) -> Record:
    """Medians of the successful processes (of all of them for the cgroup peak when none
    succeeded: a killed process still shows what it reached)."""
    ok = [s for s in samples if s.ok]
    use = ok or samples
    peak = median(s.cgroup_peak_bytes for s in use)
    return Record(
        **config_fields,
        repeats=len(samples),
        ok_repeats=len(ok),
        killed_repeats=sum(s.oom_killed for s in samples),
        error=next((s.error for s in samples if s.error), None),
        one_shot_s=median(s.one_shot_s for s in ok),
        startup_s=median(s.detail.get("import_s") for s in ok),
        first_pass_s=median(s.first_pass_s for s in ok),
        steady_s=median(s.steady_median_s for s in ok),
        peak_rss_bytes=_int(median(s.peak_rss_bytes for s in ok)),
        cgroup_peak_bytes=_int(peak),
        read_bytes=_int(median(s.read_bytes for s in ok)),
        budget_bytes=_int(median(s.budget_bytes for s in use)) if config_fields["budget"] else None,
        compute_floor_s=floors.compute_s,
        io_floor_bytes=floors.io_first_bytes,
        io_floor_s=floors.io_first_s,
        steady_io_floor_bytes=floors.io_steady_bytes,
        steady_io_floor_s=floors.io_steady_s,
        samples=tuple(samples),
    )


def _int(v: float | None) -> int | None:
    return None if v is None else int(v)


def ratios(record: Record, base: Record | None) -> dict[str, float] | None:
    """How `record` compares with a baseline: speedups (base time / this time) and peak ratios."""
    if base is None or not base.ok_repeats or not record.ok_repeats:
        return None

    def div(a, b):
        return a / b if a is not None and b else None

    out = {
        "one_shot_speedup": div(base.one_shot_s, record.one_shot_s),
        "steady_speedup": div(base.steady_s, record.steady_s),
        "peak_rss_ratio": div(record.peak_rss_bytes, base.peak_rss_bytes),
    }
    if out["peak_rss_ratio"] is not None:
        out["memory_reduction"] = 1 - out["peak_rss_ratio"]
    return {k: v for k, v in out.items() if v is not None}


def add_ratios(records: list[Record]) -> list[Record]:
    """Each record compared with `full` and `pipeswitch` of its model and device profile."""
    by_key = {(r.model, r.profile, r.label): r for r in records}
    return [
        replace(
            r,
            vs_full=ratios(r, by_key.get((r.model, r.profile, "full"))),
            vs_pipeswitch=ratios(r, by_key.get((r.model, r.profile, "pipeswitch"))),
        )
        for r in records
    ]


def killed_count(records: list[dict[str, Any]]) -> dict[str, int]:
    """How many configurations (and processes) the memory cap killed, of how many were capped.
    `records`: a document's JSON records."""
    capped = [r for r in records if r["memory_cap_bytes"] is not None and r["cap_enforced"]]
    at_budget = [r for r in capped if r.get("cap_from_budget")]
    return {
        "configurations": sum(1 for r in capped if r["killed_repeats"]),
        "capped_configurations": len(capped),
        "processes": sum(r["killed_repeats"] for r in capped),
        "capped_processes": sum(r["repeats"] for r in capped),
        "budget_capped_killed": sum(1 for r in at_budget if r["killed_repeats"]),
        "budget_capped_configurations": len(at_budget),
    }


def machine_info() -> dict[str, Any]:
    import psutil

    from hermes_ort.core.machine import cpu_name

    return {
        "hostname": platform.node(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def versions() -> dict[str, Any]:
    import numpy
    import onnxruntime

    import hermes_ort

    out = {
        "hermes_ort": hermes_ort.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }
    try:
        repo = Path(hermes_ort.__file__).resolve().parents[1]
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def to_json(obj: Any) -> Any:
    """Dataclasses, tuples and paths as plain JSON values."""
    if hasattr(obj, "__dataclass_fields__"):
        return to_json(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj


def write_document(doc: dict[str, Any], path: Path) -> Path:
    """The document as JSON; gzip-compressed when `path` ends in .gz (raw samples and RSS curves
    make a full matrix's document several MB: kept compressed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = (json.dumps(to_json(doc), indent=1) + "\n").encode()
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=9, mtime=0)
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def load_document(path: Path) -> dict[str, Any]:
    """A bench JSON file (.json or .json.gz), refusing other kinds and schema versions."""
    raw = Path(path).read_bytes()
    data = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    if data.get("kind") != KIND or data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"'{path}' is not a hermes-ort bench file of schema {SCHEMA_VERSION} "
            f"(kind {data.get('kind')!r}, schema {data.get('schema_version')!r})"
        )
    return data
