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
