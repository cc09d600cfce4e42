"""Emulating an edge board around one child process (docs/design.md §3): page-cache state, pinned
cores, a hard memory cap (memory cgroup) and throttled storage reads (blkio cgroup).

What cannot be emulated here (not root, no cgroup v1, a model on tmpfs) is said once and skipped;
each record says what was in force."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import cgroups, child_env
from bench.matrix import DeviceProfile, StorageProfile
from hermes_ort.measure.fresh_process import ChildResult, require, run_child
from hermes_ort.streaming.memory import drop_file_cache
from hermes_ort.streaming.readahead import warm_files

PROBE_BYTES = 32 << 20  # a cold read of this under 50 MB/s takes ~0.65 s


@dataclass(frozen=True)
class Emulation:
    """What this machine lets the bench emulate."""

    memory_base: Path | None  # own memory cgroup (children groups go inside)
    memory_reason: str  # why not, if memory_base is None
    blkio_base: Path | None
    blkio_reason: str
    cpus: tuple[int, ...]  # cores the bench may pin children to

    @classmethod
    def detect(cls) -> Emulation:
        memory, why_memory = cgroups.controller_base("memory")
        blkio, why_blkio = cgroups.controller_base("blkio")
        try:
            cpus = tuple(sorted(os.sched_getaffinity(0)))
        except AttributeError:
            cpus = tuple(range(os.cpu_count() or 1))
        return cls(memory, why_memory, blkio, why_blkio, cpus)

    @classmethod
    def disabled(cls, reason: str = "disabled (--no-cgroups)") -> Emulation:
        return cls(None, reason, None, reason, cls.detect().cpus)

    def warnings(
        self, profiles: tuple[DeviceProfile, ...], disk: tuple[int, int] | None
    ) -> list[str]:
        """One line for every part of the asked profiles that will run without its emulation."""
        out = []
        if any(p.memory_cap for p in profiles) and self.memory_base is None:
            out.append(
                f"memory caps not emulated ({self.memory_reason}): capped profiles run uncapped"
            )
        if any(p.storage.read_bytes_per_s for p in profiles):
            if self.blkio_base is None:
                out.append(
                    f"storage throttling not emulated ({self.blkio_reason}): "
                    "emmc/sd run at the disk's speed"
                )
            elif disk is None:
                out.append(
                    "storage throttling not emulated (the models are on no block device): "
                    "emmc/sd run at full speed"
                )
        if any(p.cores and p.cores > len(self.cpus) for p in profiles):
            out.append(f"only {len(self.cpus)} core(s) available: profiles asking more use those")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "memory_cgroup": str(self.memory_base) if self.memory_base else None,
            "memory_cgroup_missing": self.memory_reason or None,
            "blkio_cgroup": str(self.blkio_base) if self.blkio_base else None,
            "blkio_cgroup_missing": self.blkio_reason or None,
            "cpus": list(self.cpus),
        }


def prepare_cache(storage: StorageProfile, warm: list[Path], every: list[Path]) -> None:
    """Cold: evict every model file from the page cache. Warm: read the files the strategy opens
    the way the loading agents do."""
    if storage.cache == "cold":
        for path in every:
            drop_file_cache(str(path))
    else:
        warm_files(warm)


@dataclass
class Launch:
    """One child under a device profile: `with Launch(...) as l: Popen(..., preexec_fn=l.preexec)`;
    after the block, `memory` and `blkio_read_bytes` hold what the groups measured."""

    emulation: Emulation
    cores: int | None = None
    cap_bytes: int | None = None
    disk: tuple[int, int] | None = None
    read_bytes_per_s: int | None = None
    tag: str = "bench"
    memory: cgroups.MemoryStats | None = None
    blkio_read_bytes: int | None = None
    _groups: list[cgroups.Group] = field(default_factory=list)
    _procs: list[str] = field(default_factory=list)

    @property
    def cap_enforced(self) -> bool:
        return self.cap_bytes is not None and self.emulation.memory_base is not None

    @property
    def throttle_enforced(self) -> bool:
        return (
            bool(self.read_bytes_per_s)
            and self.emulation.blkio_base is not None
            and self.disk is not None
        )

    @property
    def cpus(self) -> tuple[int, ...]:
        return self.emulation.cpus[: self.cores] if self.cores else self.emulation.cpus

    def __enter__(self) -> Launch:
        try:
            if self.emulation.memory_base is not None:  # uncapped too: its peak is still measured
                cap = self.cap_bytes if self.cap_enforced else None
                self._groups.append(cgroups.MemoryGroup(self.emulation.memory_base, self.tag, cap))
            if self.emulation.blkio_base is not None and self.disk is not None:
                rate = self.read_bytes_per_s if self.throttle_enforced else None
                self._groups.append(
                    cgroups.BlkioGroup(self.emulation.blkio_base, self.tag, self.disk, rate)
                )
        except BaseException:
            self._remove()
            raise
        self._procs = [g.procs_path for g in self._groups]
        return self

    def preexec(self) -> None:
        """Runs in the child between fork and exec: join the groups, pin the cores."""
        pid = str(os.getpid()).encode()
        for procs in self._procs:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        if self.cores:
            os.sched_setaffinity(0, self.cpus)

    def __exit__(self, *exc) -> None:
        try:
            for g in self._groups:
                if isinstance(g, cgroups.MemoryGroup):
                    self.memory = g.stats()
                elif isinstance(g, cgroups.BlkioGroup):
                    self.blkio_read_bytes = g.read_bytes()
        finally:
            self._remove()

    def _remove(self) -> None:
        for g in self._groups:
            g.remove()
        self._groups.clear()


def run_under(
    launch: Launch, cmd: list[str], timeout_s: float, tell_t0: bool = True
) -> ChildResult:
    """Run `cmd` under `launch` (entered here) on the runtime's child protocol
    (measure/fresh_process.py), told its spawn time (`--t0`, so a bench child counts its
    one-shot from process start). The child is killed on timeout, error or Ctrl-C; its groups
    are always removed."""
    with launch:
        t0 = [] if not tell_t0 else ["--t0", repr(time.time())]
        return run_child([*cmd, *t0], timeout_s, launch.preexec, child_env())


def measure_read_bandwidth(
    emulation: Emulation,
    storage: StorageProfile,
    probe_dir: Path,
    disk: tuple[int, int] | None,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """Cold sequential read of a fresh probe file beside the models, in a child under the
    profile's throttle: the bandwidth the I/O floor divides by. Warm: the page cache (None)."""
    if storage.cache == "warm":
        return {"read_bytes_per_s": None, "probe_bytes": 0, "throttle_enforced": False}
    fd, name = tempfile.mkstemp(prefix=".hermes-bench-probe-", dir=probe_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(PROBE_BYTES >> 20):
                f.write(os.urandom(1 << 20))
            f.flush()
            os.fsync(f.fileno())
        drop_file_cache(name)
        launch = Launch(
            emulation, disk=disk, read_bytes_per_s=storage.read_bytes_per_s, tag="probe"
        )
        cmd = [sys.executable, "-m", "bench.child", "read", name]
        r = require(run_under(launch, cmd, timeout_s), "the bandwidth probe")
        return {
            "read_bytes_per_s": r["bytes"] / max(r["seconds"], 1e-9),
            "probe_bytes": r["bytes"],
            "probe_s": r["seconds"],
            "throttle_enforced": launch.throttle_enforced,
            "throttle_bytes_per_s": storage.read_bytes_per_s,
        }
    finally:
        os.unlink(name)
