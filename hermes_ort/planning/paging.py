"""Paged blocks in planning (streaming/paged.py: a block's session kept open on its saved packed
copies, their pages dropped after each run and prefetched before the next): what one costs,
measured or estimated, and whether a model may page at all (`paging_policy`).

Measured on SmolLM2-135M int4 and a TinyLlama-shaped int4 layer (ORT 1.32, x86, 2 threads;
bench/results/latest/paged and docs/design.md §2.8):
- between its runs a paged session keeps a small anonymous remainder (its own structures): 0.1
  to 0.4 MB a block, 12.5 MB for SmolLM2's 32 blocks over 124.1 MB of packed copies;
- its packed copies are about its quantized bytes (SmolLM2: 124.1 MB for 124.1 MB of blocks),
  file-backed while prefetched or running; a prefetch from the page cache maps 11-44 GB/s;
- opening it packs the weights again to check the saved copy: for that moment it holds ORT's
  own packed copy, the originals it packs from and the saved copies it compares (SmolLM2's
  head: 101 MB for its 31.9 MB; a TinyLlama-shaped layer: 58 MB for 33 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

from hermes_ort.core.choices import Paging
from hermes_ort.planning.layer_profile import BlockProfile
from hermes_ort.planning.schedule import BlockTimes

# anonymous bytes kept per byte of the block when nothing is measured: SmolLM2's 10% is the most
# seen (a TinyLlama-shaped layer keeps 0.3%)
PAGED_ANON_SHARE = 0.10
# bytes held while opening, per byte of the block, when nothing is measured (SmolLM2's head: 3.2)
PAGED_OPEN_FACTOR = 3.2


@dataclass(frozen=True)
class PagedCost:
    """One block, paged. Sizes in bytes, times in seconds."""

    anon_bytes: int  # kept from its opening to the end: its open session's own structures
    packed_bytes: int  # its packed copies: file-backed while prefetched or running
    open_bytes: int  # held while its session is opened (its anonymous remainder included)
    open_s: float  # opening it, once (ORT packs the weights again to check the saved copy)
    times: BlockTimes  # load = the prefetch of its packed copies; runs prepacked


def estimate_paged(
    size: int, bandwidth: float, compute: float, packing: float, overhead: int
) -> PagedCost:
    """From the block's size: its prefetch read at `bandwidth` (as a streamed block's files are,
    when nothing is measured), its runs at `compute`, its opening at `packing` bytes/s."""
    read, run = size / bandwidth, size / compute
    return PagedCost(
        anon_bytes=int(size * PAGED_ANON_SHARE),
        packed_bytes=size,
        open_bytes=int(size * PAGED_OPEN_FACTOR) + overhead,
        open_s=size / packing,
        times=BlockTimes(read, run, run, read),
    )


def measured_paged(b: BlockProfile, bandwidth: float, cold: bool) -> PagedCost | None:
    """As the profiler measured it (None where it could not page the block); `cold`: its saved
    copy's pages are dropped from the page cache after each run, so each prefetch reads them
    from storage at the profile's `bandwidth`."""
    if b.paged_bytes <= 0:
        return None
    read = b.paged_bytes / bandwidth if cold and bandwidth > 0 else b.prefetch_warm_s
    return PagedCost(
        anon_bytes=b.paged_anon_bytes,
        packed_bytes=b.paged_bytes,
        open_bytes=b.paged_open_bytes,
        open_s=b.paged_open_s,
        times=BlockTimes(read, b.run_prepack_s, b.run_prepack_s, b.prefetch_warm_s),
    )


@dataclass(frozen=True)
class PagingPolicy:
    allowed: bool  # the planner may page prepacked streamed blocks
    reason: str  # why not (empty where allowed)


def paging_policy(mode: str, cache_problem: str | None) -> PagingPolicy:
    """Paging as asked (`mode`, a Paging), where the packed copies' cache can hold the saved
    copies (`cache_problem`: why it cannot, e.g. not writable; None: it can)."""
    if Paging(mode) == Paging.OFF:
        return PagingPolicy(False, "paging off as asked: prepacked blocks re-created every pass")
    if cache_problem:
        return PagingPolicy(
            False, f"no paging: {cache_problem}; prepacked blocks re-created every pass"
        )
    return PagingPolicy(True, "")
