"""Read ahead: bring a block's files into the page cache before its session runs.

A session whose weights are mmapped opens in a few ms, but then faults its pages in during the
first run, on the inference agent's critical path. A loading agent reads the files first, so those
faults are page-cache hits. `read` releases the GIL, so several agents read in parallel."""

from __future__ import annotations

import os
import threading

_CHUNK_BYTES = 4 << 20
_buffers = threading.local()


def read_ahead(path: str) -> int:
    """Read the whole file once (into a reused per-thread buffer); returns the bytes read."""
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(_CHUNK_BYTES)
    total = 0
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while True:
            n = f.readinto(buf)
            if not n:
                return total
            total += n
