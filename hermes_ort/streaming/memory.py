"""Process memory: resident size, its peak, giving freed heap back, dropping file pages.

Peak RSS is the kernel's VmHWM, which `/proc/self/clear_refs` can reset (Linux >= 4.0), so one
process can measure the peak of each run on its own."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from dataclasses import dataclass

import psutil

_PROCESS = psutil.Process()


def rss_bytes() -> int:
    """Resident set now: anonymous + file-backed pages mapped by this process."""
    return _PROCESS.memory_info().rss


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set since process start or the last reset_peak_rss()."""
    peak = _status_kb("VmHWM")
    return peak if peak is not None else rss_bytes()


def rss_breakdown() -> dict[str, int]:
    """{"anon": bytes, "file": bytes} of the resident set (Linux only; zeros elsewhere)."""
    return {"anon": _status_kb("RssAnon") or 0, "file": _status_kb("RssFile") or 0}


_peak_before_resets = 0  # the highest VmHWM any reset_peak_rss() cleared


def process_peak_rss_bytes() -> int:
    """This process's peak resident set since exec, across every reset_peak_rss(): what a budget
    bounds. (A parent's wait4 maxrss is no substitute: the kernel records the forking parent's
    resident set into the child's maxrss at exec.)"""
    return max(_peak_before_resets, peak_rss_bytes())


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    global _peak_before_resets
    _peak_before_resets = max(_peak_before_resets, peak_rss_bytes())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def storage_read_bytes() -> int:
    """Bytes this process caused to be read from storage (page-cache hits excluded)."""
    try:
        return _PROCESS.io_counters().read_bytes
    except (psutil.AccessDenied, AttributeError, NotImplementedError):
        return 0


_libc = None
if os.name == "posix":
    _name = ctypes.util.find_library("c")
    try:
        _libc = ctypes.CDLL(_name) if _name else None
        _libc.malloc_trim  # noqa: B018  (glibc only: musl has none)
    except (OSError, AttributeError):
        _libc = None


def trim_heap() -> None:
    """Give freed heap pages back to the OS: glibc may keep what a destroyed session freed
    (docs/design.md §2.3)."""
    if _libc is not None:
        _libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
ARRAY_MMAP_THRESHOLD_BYTES = 256 * 1024


def map_large_allocations() -> bool:
    """Have glibc map every allocation over ARRAY_MMAP_THRESHOLD_BYTES on its own and unmap it
    when freed. Its default threshold rises to the size of the largest block freed (up to 32 MB),
    after which arrays made and freed every step (a running batch's KV cache: hermes_ort/serve/)
    come from the heap, whose freed pages stay resident between them (docs/design.md §2.9).
    False where the C library has no mallopt (musl)."""
    if _libc is None or not hasattr(_libc, "mallopt"):
        return False
    return bool(_libc.mallopt(M_MMAP_THRESHOLD, ARRAY_MMAP_THRESHOLD_BYTES))


def drop_file_cache(path: str) -> None:
    """Ask the kernel to drop a file's clean pages from the page cache (best effort)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class PassMeasure:
    """Latency, peak RSS and storage reads of one pass: `with PassMeasure() as m: ...`."""

    def __enter__(self) -> PassMeasure:
        reset_peak_rss()
        self.rss_before = rss_bytes()
        self.read_before = storage_read_bytes()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.latency_s = time.perf_counter() - self.t0
        self.peak = max(peak_rss_bytes(), self.rss_before)
        self.bytes_read = storage_read_bytes() - self.read_before


@dataclass(frozen=True)
class MemorySample:
    t_s: float
    rss_bytes: int


class RssSampler:
    """Samples RSS every `interval_s` on a background thread: the memory-over-time curve."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.samples: list[MemorySample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def __enter__(self) -> RssSampler:
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="hermes-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(MemorySample(time.perf_counter() - self._t0, rss_bytes()))
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append(MemorySample(time.perf_counter() - self._t0, rss_bytes()))
