"""Read ahead: bring a block's files into the page cache before its session runs.

A session whose weights are mmapped opens in a few ms, but then faults its pages in during the
first run, on the inference agent's critical path: from storage, if they are not cached. A loading
agent makes sure they are cached first. It asks the kernel which pages are resident (mincore) and
reads only the missing ones, so a warm block costs a fraction of a millisecond instead of a copy
that would compete with inference for the cores. `pread` releases the GIL: agents read in parallel.

Shared files and embedding tables are read with POSIX_FADV_RANDOM: the kernel then caches them in
small (4 KiB) folios. A session maps whole folios when it faults, so after a sequential read an
embedding lookup of a few rows maps most of its table (docs/design.md §2.4)."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading

import numpy as np

_CHUNK_BYTES = 1 << 20  # per loading agent; counts in the peak RSS
_PAGE = mmap.PAGESIZE
_buffers = threading.local()

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _mincore = _libc.mincore
    _mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    _mincore.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux/glibc: always read
    _mincore = None


def missing_pages(fd: int, size: int) -> np.ndarray | None:
    """Boolean per page: True where the page is not in the page cache (None if unknown)."""
    if _mincore is None or size == 0:
        return None
    try:
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        return None
    try:
        view = np.frombuffer(mm, dtype=np.uint8)
        pages = (size + _PAGE - 1) // _PAGE
        vec = np.zeros(pages, dtype=np.uint8)
        ok = _mincore(view.ctypes.data, size, vec.ctypes.data) == 0
        del view
        return (vec & 1) == 0 if ok else None
    finally:
        mm.close()


def _runs(missing: np.ndarray) -> list[tuple[int, int]]:
    """(first page, end page) of each run of missing pages."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], missing.astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def read_ahead(path: str, sequential: bool = False) -> int:
    """Make the whole file page-cache resident; returns the bytes actually read. `sequential`:
    the file is read only by the dense block being loaded (its own .onnx/.data), so large folios
    cost nothing and the kernel's sequential read-ahead is faster from storage (docs/design.md
    §2.4); shared files keep small folios (an embedding may be looked up sparsely by another
    block)."""
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(_CHUNK_BYTES)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if hasattr(os, "posix_fadvise"):
            advice = os.POSIX_FADV_SEQUENTIAL if sequential else os.POSIX_FADV_RANDOM
            os.posix_fadvise(fd, 0, 0, advice)
        missing = missing_pages(fd, size)
        runs = (
            [(0, size)]
            if missing is None
            else [(a * _PAGE, min(size, b * _PAGE)) for a, b in _runs(missing)]
        )
        if hasattr(os, "posix_fadvise") and not sequential:
            for start, end in runs:  # queue the I/O of every missing run at once
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
        total = 0
        for start, end in runs:
            offset = start
            while offset < end:
                n = os.preadv(fd, [memoryview(buf)[: min(_CHUNK_BYTES, end - offset)]], offset)
                if n <= 0:
                    break
                offset += n
                total += n
        return total
    finally:
        os.close(fd)


def is_cached(path: str) -> bool | None:
    """Whether every page of the file is in the page cache now (None if unknown)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        missing = missing_pages(fd, os.fstat(fd).st_size)
        return None if missing is None else not missing.any()
    finally:
        os.close(fd)


def warm_files(paths) -> int:
    """Bring files into the page cache the way the loading agents do (a benchmark's warm state)."""
    return sum(read_ahead(str(p)) for p in paths)
