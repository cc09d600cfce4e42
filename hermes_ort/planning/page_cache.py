"""The page-cache policy under a budget: whether the daemon drops a streamed block's file pages
after its run (every later pass then reads the model from storage again) or leaves them to the
kernel (later passes read none).

The budget bounds the process's resident set; the page cache is the kernel's, except where it is
charged to a memory cgroup the process runs in (a board emulated by cgroups, a container, a
systemd slice) or where free memory is actually short. So pages are dropped only there: when the
model's files would not fit beside the budget under the cgroup's limit or in the memory the
kernel reports available (docs/design.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

from hermes_ort.core.choices import PageCacheMode
from hermes_ort.core.units import format_bytes

# the share of the room left beside the budget the model's files may take before pages are
# dropped: other processes' pages and the allocator's slack need the rest
CACHE_SHARE = 0.8


@dataclass(frozen=True)
class MemorySituation:
    cgroup_limit_bytes: int | None  # the tightest limit of the process's memory cgroups
    available_bytes: int | None  # MemAvailable


@dataclass(frozen=True)
class PageCachePolicy:
    drop: bool  # the daemon drops streamed blocks' file pages after their run
    reason: str


def page_cache_policy(
    policy: str, budget: int | None, model_bytes: int, situation: MemorySituation
) -> PageCachePolicy:
    """Decide, for a budget of `budget` bytes over a model whose block files total `model_bytes`,
    whether streamed pages are dropped; `policy` "keep"/"drop" forces it, "auto" decides."""
    policy = PageCacheMode(policy)
    if policy != PageCacheMode.AUTO:
        drop = policy == PageCacheMode.DROP
        return PageCachePolicy(drop, f"page cache: '{policy}' as asked")
    if budget is None:
        return PageCachePolicy(False, "page cache: kept (no budget)")
    files = format_bytes(model_bytes)
    limit, available = situation.cgroup_limit_bytes, situation.available_bytes
    short = (
        (limit, "this process's memory cgroup limit {} is charged with the page cache and"),
        (available, "the {} of memory available"),
    )
    for room, what in short:
        if room is not None and (room - budget) * CACHE_SHARE < model_bytes:
            return PageCachePolicy(
                True,
                f"page cache: streamed blocks' pages dropped after their run: "
                f"{what.format(format_bytes(room))} has no room for the model's files ({files}) "
                f"beside the budget",
            )
    where = [f"cgroup limit {format_bytes(limit)}"] if limit is not None else []
    if available is not None:
        where.append(f"{format_bytes(available)} available")
    return PageCachePolicy(
        False,
        f"page cache: kept for the kernel to manage, later passes read nothing from storage: "
        f"room for the model's files ({files}) beside the budget "
        f"({', '.join(where) or 'no limit known'})",
    )


def cgroup_headroom(
    budget: int | None, limit: int | None, in_flight_bytes: int, smallest: int
) -> tuple[int | None, str]:
    """The budget the blocks are planned in under a memory cgroup limit, which is charged with
    the page cache of the blocks being read ahead (`in_flight_bytes`: a block's files per loading
    agent): planned up to the limit, those pages would be reclaimed before the session reads
    them, and read again (Llama-2-7B int4 at a 2 GiB cap: 4.6 GB read per pass of a 4.3 GB
    model). Below `smallest` (the least the blocks run in) the budget stays as given."""
    if budget is None or limit is None or budget + in_flight_bytes <= limit:
        return budget, ""
    ceiling = limit - in_flight_bytes
    room = format_bytes(in_flight_bytes)
    if ceiling < smallest:
        return budget, (
            f"page cache: no room below the memory cgroup limit {format_bytes(limit)} for the "
            f"blocks being read ahead ({room}): some pages may be read twice"
        )
    return ceiling, (
        f"page cache: the blocks being read ahead ({room}) are charged to the memory cgroup "
        f"(limit {format_bytes(limit)}): the blocks are planned in {format_bytes(ceiling)}"
    )
