"""The benchmark matrix: models x strategies x budgets x device profiles, and its named presets.

Spellings accepted on the command line:
- strategy: a runtime strategy, optionally `+stream` for the ablation on pipeload's load path
  ("pipeswitch+stream": the baseline's mechanism, pipeload's storage and load path);
- budget (pipeload only): "none", bytes ("150MB", "1.5GiB"), a share of the model ("25%"), the
  planner's smallest workable budget ("min") or a multiple of it ("x1.2min"), or "cap" (the device
  profile's memory cap);
- device profile: STORAGE[:Nc][:CAP], e.g. "warm", "sd:1c", "emmc:2c:512MB", "cold:x1.5min";
  STORAGE is one of `STORAGE` (cache state and read bandwidth), Nc pins N cores, CAP is a hard
  memory cap (a budget spelling other than none/cap) that every strategy runs under.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from hermes_ort.core.units import parse_bytes
from hermes_ort.planning.strategies import LOAD_PATHS, STRATEGIES

RUNTIME_STRATEGIES = tuple(STRATEGIES)
# the ablation (+stream) applies to the fixed per-block baselines
BASELINES_WITH_LOAD_PATH = tuple(
    s.name for s in STRATEGIES.values() if s.engine == "blocks" and s.residency != "planned"
)


@dataclass(frozen=True)
class StrategySpec:
    name: str  # a runtime strategy
    load_path: str = "default"  # "stream": pipeload's storage and load path (ablation)

    @property
    def label(self) -> str:
        return self.name if self.load_path == "default" else f"{self.name}+{self.load_path}"


def parse_strategy(text: str) -> StrategySpec:
    """'pipeload', 'full', 'pipeswitch+stream', ... -> StrategySpec."""
    name, _, path = text.strip().partition("+")
    if name not in RUNTIME_STRATEGIES:
        raise ValueError(
            f"unknown strategy '{text}' (choose from {', '.join(RUNTIME_STRATEGIES)}, "
            f"optionally +stream for {', '.join(BASELINES_WITH_LOAD_PATH)})"
        )
    if path and (path not in LOAD_PATHS or name not in BASELINES_WITH_LOAD_PATH):
        raise ValueError(
            f"'{text}': only {', '.join(BASELINES_WITH_LOAD_PATH)} take a load path (+stream)"
        )
    return StrategySpec(name, path or "default")


@dataclass(frozen=True)
class Budget:
    text: str  # as written
    kind: str  # "none" | "bytes" | "model" (share of it) | "min" (multiple of it) | "cap"
    value: float = 0.0  # bytes, share or multiple

    def resolve(
        self, model_bytes: int, min_budget_bytes: int, cap_bytes: int | None = None
    ) -> int | None:
        """Bytes for one model (None: no budget)."""
        if self.kind == "none":
            return None
        if self.kind == "bytes":
            return int(self.value)
        if self.kind == "model":
            return int(self.value * model_bytes)
        if self.kind == "min":
            return int(self.value * min_budget_bytes)
        return cap_bytes  # "cap"


_MIN = re.compile(r"^x?\s*([0-9]*\.?[0-9]+)?\s*x?\s*min$")


def parse_budget(text: str) -> Budget:
    """'none' | '150MB' | '25%' | 'min' | 'x1.2min' | 'cap' -> Budget."""
    t = text.strip().lower()
    if t in ("none", "unlimited", ""):
        return Budget("none", "none")
    if t == "cap":
        return Budget("cap", "cap")
    if t.endswith("%"):
        share = float(t[:-1]) / 100
        if share <= 0:
            raise ValueError(f"budget '{text}' must be a positive share of the model")
        return Budget(text.strip(), "model", share)
    m = _MIN.match(t)
    if m:
        factor = float(m.group(1)) if m.group(1) else 1.0
        if factor <= 0:
            raise ValueError(f"budget '{text}' must be a positive multiple of min")
        return Budget(text.strip(), "min", factor)
    return Budget(text.strip(), "bytes", float(parse_bytes(t)))


def min_budget_at(factor: float, min_bytes: int) -> int:
    """A budget of `factor` x the smallest workable one, rounded up to a MiB (so RSS noise between
    the process that measured `min_bytes` and the one that plans cannot refuse it)."""
    return math.ceil(factor * min_bytes / (1 << 20)) << 20


def margin_bytes(margin: str, budget: int) -> int:
    """'10%' of the budget, or a byte size ('16MB')."""
    text = margin.strip()
    if text.endswith("%"):
        share = float(text[:-1]) / 100
        if share < 0:
            raise ValueError(f"cap margin '{margin}' must not be negative")
        return int(share * budget)
    return parse_bytes(text)


@dataclass(frozen=True)
class StorageProfile:
    name: str
    cache: str  # "warm": model files in the page cache first; "cold": evicted first
    read_bytes_per_s: int | None  # throttle of storage reads; None = the disk's own speed
    about: str = ""


STORAGE = {
    "warm": StorageProfile("warm", "warm", None, "model files in the page cache"),
    "cold": StorageProfile("cold", "cold", None, "page cache evicted, disk at full speed"),
    "emmc": StorageProfile("emmc", "cold", 250_000_000, "evicted, reads throttled to 250 MB/s"),
    "sd": StorageProfile("sd", "cold", 50_000_000, "evicted, reads throttled to 50 MB/s (SD card)"),
}


@dataclass(frozen=True)
class DeviceProfile:
    storage: StorageProfile
    cores: int | None = None  # pin to this many cores; None = all the bench may use
    memory_cap: Budget | None = None  # hard cap of the child's memory cgroup

    @property
    def text(self) -> str:
        parts = [self.storage.name]
        if self.cores:
            parts.append(f"{self.cores}c")
        if self.memory_cap:
            parts.append(self.memory_cap.text)
        return ":".join(parts)


def parse_profile(text: str) -> DeviceProfile:
    """'STORAGE[:Nc][:CAP]', e.g. 'sd:1c:512MB' -> DeviceProfile."""
    name, *parts = [p.strip() for p in text.strip().split(":")]
    if name not in STORAGE:
        raise ValueError(
            f"unknown storage profile '{name}' in '{text}' (choose from {', '.join(STORAGE)})"
        )
    profile = DeviceProfile(STORAGE[name])
    for part in parts:
        if re.fullmatch(r"[0-9]+c", part):
            if int(part[:-1]) < 1:
                raise ValueError(f"'{text}': cores must be at least 1")
            profile = replace(profile, cores=int(part[:-1]))
            continue
        cap = parse_budget(part)
        if cap.kind in ("none", "cap"):
            raise ValueError(f"'{text}': a memory cap must be a size, a share or a multiple of min")
        profile = replace(profile, memory_cap=cap)
    return profile


@dataclass(frozen=True)
class Matrix:
    name: str
    models: tuple[str, ...]  # preset names or exported model directories
    strategies: tuple[StrategySpec, ...]
    budgets: tuple[Budget, ...]  # pipeload's; the baselines run without one
    profiles: tuple[DeviceProfile, ...]
    repeats: int = 3  # fresh processes per configuration
    passes: int = 5  # passes per process: the first (one-shot) and passes-1 steady ones


def _matrix(name, models, strategies, budgets, profiles, repeats, passes) -> Matrix:
    return Matrix(
        name,
        tuple(models),
        tuple(parse_strategy(s) for s in strategies),
        tuple(parse_budget(b) for b in budgets),
        tuple(parse_profile(p) for p in profiles),
        repeats,
        passes,
    )


PAPER_MODELS = (
    "bert-base",
    "bert-large",
    "vit-base",
    "vit-large",
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
)
ALL_STRATEGIES = (
    "full",
    "full-mmap",
    "pipeswitch",
    "ondemand",
    "pipeswitch+stream",
    "ondemand+stream",
    "pipeload",
)

MATRICES: dict[str, Matrix] = {
    # CI: tiny presets, a couple of minutes on 2 cores (exports included)
    "smoke": _matrix(
        "smoke",
        ("tiny-bert", "tiny-gpt2"),
        ("full", "pipeswitch", "ondemand", "pipeswitch+stream", "pipeload"),
        ("min", "none"),
        ("warm", "sd:1c:200MB"),
        repeats=2,
        passes=3,
    ),
    # the paper's table: pipeload against pipeswitch and full, loading from storage
    "paper": _matrix(
        "paper",
        PAPER_MODELS,
        ("full", "pipeswitch", "pipeload"),
        ("min", "x2min"),
        ("cold", "emmc"),
        repeats=3,
        passes=3,
    ),
    # the full matrix (62 min here): every paper model, strategy and ablation; budgets from the
    # smallest to twice it and the cap; a warm page cache, and an eMMC board with half the model's
    # size in memory (the baselines get killed there: recorded, not fatal). Other storage (cold, sd)
    # and core counts: --profiles.
    "full": _matrix(
        "full",
        PAPER_MODELS,
        ALL_STRATEGIES,
        ("min", "x2min", "cap"),
        ("warm", "emmc:2c:50%"),
        repeats=3,
        passes=3,
    ),
}


def build_matrix(
    name: str = "smoke",
    models: list[str] | None = None,
    strategies: list[str] | None = None,
    budgets: list[str] | None = None,
    profiles: list[str] | None = None,
    repeats: int | None = None,
    passes: int | None = None,
) -> Matrix:
    """A named matrix with any axis overridden."""
    if name not in MATRICES:
        raise ValueError(f"unknown matrix '{name}' (choose from {', '.join(MATRICES)})")
    m = MATRICES[name]
    if repeats is not None and repeats < 1 or passes is not None and passes < 1:
        raise ValueError("repeats and passes must be at least 1")
    return Matrix(
        name=m.name,
        models=tuple(models) if models else m.models,
        strategies=tuple(parse_strategy(s) for s in strategies) if strategies else m.strategies,
        budgets=tuple(parse_budget(b) for b in budgets) if budgets else m.budgets,
        profiles=tuple(parse_profile(p) for p in profiles) if profiles else m.profiles,
        repeats=repeats or m.repeats,
        passes=passes or m.passes,
    )


@dataclass(frozen=True)
class Config:
    model: str
    strategy: StrategySpec
    budget: Budget | None  # pipeload only
    profile: DeviceProfile

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (
            self.model,
            self.strategy.label,
            self.budget.text if self.budget else "-",
            self.profile.text,
        )


def expand(matrix: Matrix) -> list[Config]:
    """Every configuration, grouped by model then profile. pipeload runs once per budget, each
    baseline once ("cap" is skipped where the profile has no cap: it would repeat "none")."""
    configs = []
    for model in matrix.models:
        for profile in matrix.profiles:
            for strategy in matrix.strategies:
                if strategy.name != "pipeload":
                    configs.append(Config(model, strategy, None, profile))
                    continue
                for budget in matrix.budgets:
                    if budget.kind == "cap" and profile.memory_cap is None:
                        continue
                    configs.append(Config(model, strategy, budget, profile))
    seen: set = set()
    return [c for c in configs if not (c.key in seen or seen.add(c.key))]
