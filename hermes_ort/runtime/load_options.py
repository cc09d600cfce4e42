"""The options of `hermes_ort.load`, checked in one place (`parse_load_options`) before any file
is read, into one frozen record that the single-board model and its planner read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hermes_ort.core.choices import (
    LoadPath,
    Objective,
    PageCacheMode,
    Paging,
    StrategyName,
    VerifyMode,
    choose,
)
from hermes_ort.core.errors import OptionError
from hermes_ort.core.units import parse_bytes


@dataclass(frozen=True)
class LoadOptions:
    strategy: StrategyName = StrategyName.PIPELOAD
    budget_bytes: int | None = None  # None: no limit (or "min", see smallest)
    smallest: bool = False  # memory_budget="min": the smallest workable budget
    loaders: int | None = None
    window: int | None = None
    load_path: LoadPath = LoadPath.DEFAULT
    profile: bool | None = None
    verify: VerifyMode = VerifyMode.ONCE
    objective: Objective = Objective.REPEATED
    page_cache: PageCacheMode = PageCacheMode.AUTO
    trace: bool = False
    paging: Paging = Paging.AUTO


def parse_load_options(
    memory_budget: Any = None,
    strategy: str = "pipeload",
    loaders: int | None = None,
    window: int | None = None,
    load_path: str = "default",
    profile: bool | None = None,
    verify: str = "once",
    objective: str = "repeated",
    page_cache: str = "auto",
    trace: bool = False,
    paging: str = "auto",
) -> LoadOptions:
    """Every option as `load` documents it, or OptionError naming the first bad one."""
    for name, value in (("loaders", loaders), ("window", window)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise OptionError(f"{name} must be a whole number of at least 1, got {value!r}")
    if profile not in (None, True, False):
        raise OptionError(f"profile must be None, True or False, got {profile!r}")
    smallest = isinstance(memory_budget, str) and memory_budget.strip().lower() == "min"
    return LoadOptions(
        strategy=choose(StrategyName, strategy, "strategy"),
        budget_bytes=None if smallest else parse_bytes(memory_budget),
        smallest=smallest,
        loaders=loaders,
        window=window,
        load_path=choose(LoadPath, load_path, "load_path"),
        profile=profile,
        verify=choose(VerifyMode, verify, "verify"),
        objective=choose(Objective, objective, "objective"),
        page_cache=choose(PageCacheMode, page_cache, "page_cache"),
        trace=bool(trace),
        paging=choose(Paging, paging, "paging"),
    )
