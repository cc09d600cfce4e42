"""Paged blocks: every block's session stays open, its packed weights file-backed, and its pages
are dropped after it runs and faulted in again before its next run (issue #24).

A MatMulNBits block runs fast only on weights ONNX Runtime packed at session creation (~0.26 GB/s
of CPU, docs/design.md §2.7); streamed, it is re-created and re-packed on every pass. A session
opened from the block's saved packed copy (packed_copies.py) still packs at creation, but then
hashes its fresh copy, compares it byte for byte with the saved one (ORT 1.32), uses the saved
one, mapped MAP_PRIVATE from the file, and frees its own. After creation its weights are clean
file pages, which `PagedSession.drop` hands back to the kernel (mapped_ranges.py) while the
session, and its few hundred KB of anonymous structures, stays open; `prefetch` maps its packed
copies again before the next run.

    block = open_paged(model_dir / "blocks/layer_03.onnx")   # saved first if not cached
    outputs = block.run(names, feeds)
    block.drop()        # its file pages leave this process (and the page cache if asked)
    block.prefetch()    # ...and come back before its next run (else they fault in during it)
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from hermes_ort.core.choices import VerifyMode
from hermes_ort.core.errors import HermesError, LoadError
from hermes_ort.core.settings import PREPACKED_STREAMING, SessionSettings
from hermes_ort.streaming.mapped_ranges import (
    PAGE_BYTES,
    MappedRange,
    PageCounts,
    drop_spans,
    madvise_available,
    mapped_ranges,
    merged_spans,
    page_counts,
    prefetch_ranges,
    prefetch_spans,
    written_ranges,
)
from hermes_ort.streaming.memory import drop_file_cache
from hermes_ort.streaming.packed_copies import (
    PackedCopy,
    PackedCopyError,
    cache_problem,
    check_saved,
    packed_copies,
    save_packed,
)
from hermes_ort.streaming.sessions import create_session, run_session

CHECKED_DROPS = 3  # drops that first check ORT wrote to no mapped page (a pagemap read each)


def copy_ranges(copy: PackedCopy, ranges: tuple[MappedRange, ...]) -> list[MappedRange]:
    """The pages of this process's mappings that hold the copy (page-aligned)."""
    first = copy.offset // PAGE_BYTES * PAGE_BYTES
    end = copy.offset + max(copy.bytes, 1)
    found = []
    for r in ranges:
        lo, hi = max(first, r.offset), min(end, r.offset + r.bytes)
        if lo < hi:
            start = r.start + (lo - r.offset) // PAGE_BYTES * PAGE_BYTES
            stop = r.start + -(-(hi - r.offset) // PAGE_BYTES) * PAGE_BYTES
            found.append(MappedRange(start, stop, lo, r.private))
    return found


def unadopted(copies: tuple[PackedCopy, ...], ranges: tuple[MappedRange, ...]) -> list[str]:
    """Copies of which this process maps no page right after creation: ORT validates an adopted
    copy byte for byte (so every page of it was touched) and never reads one whose key does not
    match its kernel's layout (it packed its own, in anonymous memory)."""
    missing = []
    for copy in copies:
        covering = copy_ranges(copy, ranges)
        if not covering or page_counts(covering).resident_bytes == 0:
            missing.append(f"{copy.tensor} ({copy.kernel})")
    return missing


# -- the session -----------------------------------------------------------------------------------
class PagedSession:
    """A block's session opened from its saved packed copy, whose mapped weights can be dropped
    between runs and fetched again before one.

        paged = PagedSession(save_packed(block, cache))
        outputs = paged.run(names, feeds)
        paged.drop()       # its file pages leave this process (and the page cache if asked)
        paged.prefetch()   # ...and come back before the next run (else they fault in during it)

    One PagedSession per saved copy in a process: its pages are found by file. `drop` and
    `prefetch` may run on other threads than `run` (a daemon, a loading agent), but the caller
    orders the two of one block: a prefetch that races a drop leaves the pages to fault in."""

    def __init__(
        self,
        saved_onnx: str | Path,
        threads: int = 0,
        verify: VerifyMode = VerifyMode.ONCE,
        settings: SessionSettings = PREPACKED_STREAMING,
        what: str = "",
    ):
        self.path = Path(saved_onnx)
        self.what = what or f"paged block '{self.path.stem}'"
        meta = check_saved(self.path, verify)
        self.data_path = self.path.parent / meta["files"][1]["path"]
        copies = packed_copies(self.path)
        before = set(mapped_ranges(self.data_path))
        opened = replace(settings, prepack=True, optimization="disable", threads=threads)
        t0 = time.perf_counter()
        try:
            self.session = create_session(self.path, opened, self.what)
        except LoadError as e:
            raise PackedCopyError(f"{e}; delete '{self.path.parent}' and save it again") from e
        self.create_s = time.perf_counter() - t0
        self.ranges = tuple(r for r in mapped_ranges(self.data_path) if r not in before)
        missing = unadopted(copies, self.ranges)
        if missing:
            self.session = None
            raise PackedCopyError(
                f"ONNX Runtime did not use {len(missing)} of the {len(copies)} packed copies in "
                f"'{self.data_path}' (e.g. {missing[0]}): they were made for another kernel "
                f"layout; delete '{self.path.parent}' and save it again"
            )
        self.copies = copies
        # what a run reads whole: the packed copies (a rotary or embedding table, read a few
        # rows a pass, faults in what it needs)
        dense = [r for c in copies for r in copy_ranges(c, self.ranges)]
        self.dense_spans = merged_spans(dense)
        self._dense_file_spans = merged_spans(  # the same pages as file offsets
            MappedRange(r.offset, r.offset + r.bytes, r.offset, True) for r in dense
        )
        self._clean = merged_spans(self.ranges)
        self._unchecked_drops = CHECKED_DROPS
        self.written: tuple[MappedRange, ...] = ()

    def _check_open(self) -> None:
        # its addresses are ORT's mappings only while the session lives: once it is destroyed,
        # they may hold anything (a madvise there would zero another allocation's pages)
        if self.session is None:
            raise HermesError(f"{self.what} is closed")

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list:
        self._check_open()
        return run_session(self.session, output_names, feeds, self.what)

    def drop(self, drop_cache: bool = False, check: bool = False) -> tuple[MappedRange, ...]:
        """Unmap its weights' pages from this process; `drop_cache`: and ask the kernel to drop
        the file from the page cache (the next run then reads it from storage). Its first
        CHECKED_DROPS drops (and any with `check`) first look for ranges ORT wrote to (a private
        copy that dropping would lose: those are left alone from then on, and returned)."""
        self._check_open()
        if check or self._unchecked_drops > 0:
            self._unchecked_drops -= 1
            written = written_ranges(self.ranges)
            if written != self.written:
                self.written = written
                self._clean = merged_spans(r for r in self.ranges if r not in written)
        drop_spans(self._clean)
        if drop_cache:
            drop_file_cache(str(self.data_path))
        return self.written

    def prefetch(self, whole: bool = False) -> None:
        """Fault its packed weights' pages in now, from the page cache or storage (the GIL
        released); `whole`: every mapped page, sparse tables included. Pages not cached are
        first queued for reading in large requests (POSIX_FADV_WILLNEED): faulted in one by one
        they would be read a readahead window at a time."""
        self._check_open()
        if whole:
            prefetch_ranges(self.ranges)
            return
        if self._dense_file_spans and hasattr(os, "posix_fadvise"):
            fd = os.open(self.data_path, os.O_RDONLY)
            try:
                for offset, length in self._dense_file_spans:
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        prefetch_spans(self.dense_spans)

    def pages(self) -> PageCounts:
        return page_counts(self.ranges)

    def resident_bytes(self) -> int:
        """Bytes of its mapped weights resident in this process now."""
        return self.pages().resident_bytes

    @property
    def dense_bytes(self) -> int:
        """Bytes `prefetch` brings in: the pages of its packed copies."""
        return sum(n for _, n in self.dense_spans)

    @property
    def mapped_bytes(self) -> int:
        return sum(r.bytes for r in self.ranges)

    def close(self) -> None:
        """Destroy the session (ORT unmaps its weights) and forget its addresses."""
        self.ranges, self.dense_spans, self._clean = (), (), ()
        self.session = None


def paging_problem(cache_dir: str | Path | None = None) -> str | None:
    """Why blocks cannot be paged here, or None: paging reads /proc/self/maps and pagemap and
    calls madvise (Linux), and saves copies into the cache (packed_copies.cache_problem)."""
    if not Path("/proc/self/pagemap").exists() or not madvise_available():
        return "paging needs Linux (/proc/self/pagemap, madvise)"
    try:
        with open("/proc/self/pagemap", "rb"):
            pass
    except OSError as e:
        return f"/proc/self/pagemap cannot be read ({e.strerror or e})"
    return cache_problem(cache_dir)


def open_paged(
    block_onnx: str | Path,
    cache_dir: str | Path | None = None,
    threads: int = 0,
    verify: VerifyMode = VerifyMode.ONCE,
    file_sha256: dict[str, str] | None = None,
) -> PagedSession:
    """A paged session of a block: its saved copy from the cache, saved first if missing."""
    saved = save_packed(block_onnx, cache_dir, threads, file_sha256=file_sha256)
    return PagedSession(saved, threads, verify, what=f"paged block '{Path(block_onnx).stem}'")
