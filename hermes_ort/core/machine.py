"""This machine as the planner and the profile see it: its cores and its CPU (no ONNX Runtime)."""

from __future__ import annotations

import os
import platform


def default_threads() -> int:
    """Cores this process may run on (taskset/affinity respected)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def cpu_name() -> str:
    """The CPU's model name (x86-64), or its part number (aarch64: 'CPU part 0xd08' on a Pi 4)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu part", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


UNLIMITED = 1 << 62  # cgroup v1 writes "no limit" as 2**63 - 4096 rounded to pages


def cgroup_memory_limit(proc_cgroup: str | None = None, root: str = "/sys/fs/cgroup") -> int | None:
    """The tightest memory limit over this process's memory cgroup and its ancestors (v1
    `memory.limit_in_bytes`, v2 `memory.max`), in bytes; None where there is none. The page cache
    of the files a process reads is charged to that group, so a limit bounds it too."""
    if proc_cgroup is None:
        try:
            with open("/proc/self/cgroup") as f:
                proc_cgroup = f.read()
        except OSError:
            return None
    limits = []
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2: one unified tree
            mounts, name = (os.path.join(root, "unified"), root), "memory.max"
        elif "memory" in controllers.split(","):
            mounts, name = (os.path.join(root, "memory"),), "memory.limit_in_bytes"
        else:
            continue
        for mount in mounts:
            parts = [p for p in path.split("/") if p]
            for depth in range(len(parts), -1, -1):
                limit = _read_limit(os.path.join(mount, *parts[:depth], name))
                if limit is not None:
                    limits.append(limit)
    return min(limits) if limits else None


def _read_limit(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if not text.isdigit():  # v2 "max"
        return None
    value = int(text)
    return value if value < UNLIMITED else None


def available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """The kernel's estimate of memory available without swapping (MemAvailable), in bytes; it
    counts reclaimable page cache, this process's own files' pages included."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
