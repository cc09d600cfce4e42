"""The ranges of this process's address space that map one file, and their pages: which are
resident, dropping them, faulting them in again. Linux only (ctypes to libc, /proc/self).

A session opened from a saved copy of a block (paged.py) keeps its packed weights in MAP_PRIVATE
mappings of its .data file. Pages of such a mapping that were only read are the page cache's:
madvise(MADV_DONTNEED) unmaps them from this process (they leave its RssFile) and the next touch
maps them again from the file. A page the process wrote to is a private anonymous copy (copy on
write): dropping it would bring back the file's bytes, so `drop_ranges` leaves ranges holding
one alone.

Residency is read from /proc/self/pagemap (bit 63: present in this process's page tables; bit 61:
a file page), not mincore, which answers for the page cache whether or not this process maps the
page."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAGE_BYTES = mmap.PAGESIZE
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_POPULATE_READ = 22  # Linux >= 5.14: fault the pages in now (asm-generic value: x86, arm64)
_PRESENT = np.uint64(1 << 63)
_FILE = np.uint64(1 << 61)

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux/glibc: nothing can be dropped
    _madvise = None


def madvise_available() -> bool:
    """Whether pages can be dropped and faulted in here (libc's madvise found)."""
    return _madvise is not None


@dataclass(frozen=True)
class MappedRange:
    """One mapping of the file: virtual addresses [start, end), from file offset `offset`."""

    start: int
    end: int
    offset: int
    private: bool  # MAP_PRIVATE ("p" in /proc/self/maps)

    @property
    def bytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PageCounts:
    """Pages of some ranges as this process maps them now, in bytes."""

    mapped_bytes: int  # the ranges' size
    file_bytes: int  # resident and still the file's (clean, droppable)
    anon_bytes: int  # resident private copies (written to: never dropped)

    @property
    def resident_bytes(self) -> int:
        return self.file_bytes + self.anon_bytes


def mapped_ranges(path: str | Path) -> tuple[MappedRange, ...]:
    """Every mapping of the file at `path` in this process (matched by device and inode, so any
    spelling of the path, or a renamed file, is found), in address order."""
    st = os.stat(path)
    found = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 5 or parts[4] != str(st.st_ino) or parts[4] == "0":
                continue
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            if os.makedev(major, minor) != st.st_dev:
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            found.append(MappedRange(start, end, int(parts[2], 16), parts[1][3] == "p"))
    return tuple(sorted(found, key=lambda r: r.start))


def _pagemap(r: MappedRange, fd: int) -> np.ndarray:
    pages = r.bytes // PAGE_BYTES
    raw = os.pread(fd, pages * 8, r.start // PAGE_BYTES * 8)
    return np.frombuffer(raw, dtype=np.uint64)


def page_counts(ranges: Iterable[MappedRange]) -> PageCounts:
    """How many of the ranges' pages this process has resident, file-backed and private."""
    mapped = file_pages = anon_pages = 0
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        for r in ranges:
            entries = _pagemap(r, fd)
            present = (entries & _PRESENT) != 0
            is_file = (entries & _FILE) != 0
            mapped += r.bytes
            file_pages += int(np.count_nonzero(present & is_file))
            anon_pages += int(np.count_nonzero(present & ~is_file))
    finally:
        os.close(fd)
    return PageCounts(mapped, file_pages * PAGE_BYTES, anon_pages * PAGE_BYTES)


def _advise(r: MappedRange, advice: int) -> int:
    """madvise on one range; 0 or the errno."""
    if _madvise is None:
        return errno.ENOSYS
    if _madvise(r.start, r.bytes, advice) == 0:
        return 0
    return ctypes.get_errno()


def written_ranges(ranges: Iterable[MappedRange]) -> tuple[MappedRange, ...]:
    """The ranges holding a page this process wrote to (a private anonymous copy), and shared
    ranges: dropping them would lose data or touch other processes' view."""
    found = []
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        for r in ranges:
            entries = _pagemap(r, fd)
            if not r.private or np.any(((entries & _PRESENT) != 0) & ((entries & _FILE) == 0)):
                found.append(r)
    finally:
        os.close(fd)
    return tuple(found)


def merged_spans(ranges: Iterable[MappedRange]) -> tuple[tuple[int, int], ...]:
    """(start address, bytes) of the ranges, adjacent ones merged: one madvise call each."""
    spans: list[list[int]] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if spans and spans[-1][0] + spans[-1][1] >= r.start:
            spans[-1][1] = max(spans[-1][1], r.end - spans[-1][0])
        else:
            spans.append([r.start, r.bytes])
    return tuple((a, n) for a, n in spans)


def drop_spans(spans: Iterable[tuple[int, int]]) -> int:
    """Unmap the spans' pages (MADV_DONTNEED): clean file pages fault back in from the file on
    their next touch. Only for spans of clean private ranges (`written_ranges`). Returns how
    many calls failed."""
    return sum(_advise(MappedRange(a, a + n, 0, True), MADV_DONTNEED) != 0 for a, n in spans)


def drop_ranges(ranges: Iterable[MappedRange]) -> tuple[MappedRange, ...]:
    """Unmap the pages of the ranges holding no written page; returns the ranges left alone."""
    ranges = tuple(ranges)
    kept = written_ranges(ranges)
    drop_spans(merged_spans(r for r in ranges if r not in kept))
    return kept


def prefetch_spans(spans: Iterable[tuple[int, int]]) -> None:
    """Fault the spans' pages in now (MADV_POPULATE_READ), else ask the kernel to read them into
    the page cache (MADV_WILLNEED: the run still maps them, with minor faults). ctypes releases
    the GIL for the call: a thread can prefetch while another runs."""
    for a, n in spans:
        r = MappedRange(a, a + n, 0, True)
        if _advise(r, MADV_POPULATE_READ) != 0:
            _advise(r, MADV_WILLNEED)


def prefetch_ranges(ranges: Iterable[MappedRange]) -> None:
    """prefetch_spans over whole ranges."""
    prefetch_spans(merged_spans(ranges))
