"""Runs a matrix: every configuration in a fresh process under its device profile, `repeats` times
(round-robin, so slow drifts of the machine spread over all configurations), plus the floors.

Configurations are grouped by core count: the layer profile the planner uses is stored per core
count, so each group profiles its models first (`hermes-ort profile`, skipped when it matches)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import cgroups
from bench.device import (
    Emulation,
    Launch,
    measure_read_bandwidth,
    prepare_cache,
    run_under,
)
from bench.matrix import STORAGE, Config, Matrix, expand, margin_bytes, min_budget_at
from bench.models import (
    ModelFacts,
    describe,
    ensure_exported,
    ensure_profile,
    model_dir_for,
    model_files,
)
from bench.progress import Progress
from bench.records import (
    KIND,
    SCHEMA_VERSION,
    Floors,
    Sample,
    add_ratios,
    aggregate,
    io_floors,
    machine_info,
    median,
    sample_from_child,
    seconds,
    versions,
)
from hermes_ort.core.errors import HermesError
from hermes_ort.core.manifest import Manifest, load_manifest
from hermes_ort.core.units import format_bytes
from hermes_ort.planning.strategies import get_strategy

FLOOR_PASSES = 5


@dataclass(frozen=True)
class RunOptions:
    models_dir: Path = Path("models")
    timeout_s: float = 900.0  # per process
    profile: bool = True  # `hermes-ort profile` each model first (the planner's measured costs)
    cgroups: bool = True  # False: no memory cap, no throttle even where possible
    sample_interval_s: float = 0.01  # RSS sampling in the children
    progress: bool = True
    # cap every configuration that has a budget at that budget plus this margin (a share, "10%",
    # or bytes, "16MB"); None: only the profiles' own caps
    budget_cap_margin: str | None = None
    objective: str = "repeated"  # what pipeload's plans make fastest (planner.OBJECTIVES)


@dataclass(frozen=True)
class _Model:
    name: str
    model_dir: Path
    manifest: Manifest
    disk: tuple[int, int] | None


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Runner:
    def __init__(self, matrix: Matrix, options: RunOptions):
        self.matrix = matrix
        self.options = options
        self.emulation = Emulation.detect() if options.cgroups else Emulation.disabled()
        self.models: dict[str, _Model] = {}
        self.facts: dict[tuple[str, int], ModelFacts] = {}
        self.floors: dict[tuple[str, int], Sample] = {}
        self.bandwidth: dict[str, dict[str, Any]] = {}
        self.samples: dict[tuple, list[Sample]] = {}
        self.warnings: list[str] = []

    def cores_of(self, config: Config) -> int:
        n = len(self.emulation.cpus)
        return min(config.profile.cores, n) if config.profile.cores else n

    # -- preparation ------------------------------------------------------------------------------
    def prepare_models(self) -> None:
        from bench.cgroups import disk_of

        for name in self.matrix.models:
            model_dir = model_dir_for(name, self.options.models_dir)
            ensure_exported(name, model_dir, log=_log)
            self.models[name] = _Model(
                name, model_dir, load_manifest(model_dir), disk_of(model_dir)
            )
        first = next(iter(self.models.values()))
        self.warnings += self.emulation.warnings(self.matrix.profiles, first.disk)
        for w in self.warnings:
            _log(f"hermes-ort bench: warning: {w}")

    def measure_storage(self) -> None:
        first = next(iter(self.models.values()))
        for storage in {p.storage.name: p.storage for p in self.matrix.profiles}.values():
            try:
                bw = measure_read_bandwidth(self.emulation, storage, first.model_dir, first.disk)
            except (OSError, HermesError) as e:
                bw = {"read_bytes_per_s": None, "error": str(e)}
                self.warnings.append(f"storage '{storage.name}': bandwidth not measured: {e}")
            self.bandwidth[storage.name] = {
                "cache": storage.cache,
                "about": storage.about,
                "throttle_bytes_per_s": storage.read_bytes_per_s,
                **bw,
            }

    def prepare_cores(self, cores: int, progress: Progress) -> None:
        """Profile (if asked), describe, and measure the compute floor of every model at `cores`."""
        pin = cores if cores < len(self.emulation.cpus) else None
        for m in self.models.values():
            progress.start(f"{m.name} at {cores} core(s): profile, floor")
            if self.options.profile:
                why = ensure_profile(m.model_dir, self.emulation, pin, self.options.timeout_s)
                if why:
                    self.warnings.append(
                        f"{m.name}: `hermes-ort profile` failed at {cores} core(s) ({why}): "
                        "the planner estimates"
                    )
            self.facts[(m.name, cores)] = describe(
                m.name, m.model_dir, self.emulation, pin, self.options.timeout_s
            )
            prepare_cache(STORAGE["warm"], model_files(m.manifest, m.model_dir, "pipeswitch"), [])
            launch = Launch(
                Emulation(None, "", None, "", self.emulation.cpus), cores=pin, tag="floor"
            )
            sample = self._spawn(
                launch,
                self._child_cmd(
                    m, "pipeswitch", "default", None, None, max(FLOOR_PASSES, self.matrix.passes)
                ),
                0,
            )
            self.floors[(m.name, cores)] = sample
            floor = median(sample.steady_compute_s)
            progress.done(
                f"{m.name} floor at {cores} core(s)",
                f"compute floor {floor * 1000:.1f} ms" if floor else f"failed: {sample.error}",
            )

    # -- one configuration ------------------------------------------------------------------------
    def _child_cmd(
        self,
        m: _Model,
        strategy: str,
        load_path: str,
        budget: int | None,
        min_factor: float | None,
        passes: int,
    ) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "bench.child",
            "run",
            str(m.model_dir),
            "--strategy",
            strategy,
            "--load-path",
            load_path,
            "--passes",
            str(passes),
            "--sample-interval",
            str(self.options.sample_interval_s),
            "--objective",
            self.options.objective,
        ]
        if min_factor is not None:
            cmd += ["--budget-min-factor", repr(min_factor)]
        elif budget is not None:
            cmd += ["--budget", str(budget)]
        return cmd

    def _spawn(self, launch: Launch, cmd: list[str], repeat: int) -> Sample:
        result = run_under(launch, cmd, self.options.timeout_s)
        return sample_from_child(
            repeat, result, launch.memory, launch.blkio_read_bytes, launch.cap_enforced
        )

    def cap_bytes(self, config: Config) -> int | None:
        """The memory cap of a configuration's cgroup: its profile's, and with budget caps on,
        its budget plus the margin (the lower of the two)."""
        profile_cap = self.profile_cap_bytes(config)
        caps = [] if profile_cap is None else [profile_cap]
        budget = self.budget_bytes(config)
        if self.options.budget_cap_margin and budget is not None:
            caps.append(budget + margin_bytes(self.options.budget_cap_margin, budget))
        return min(caps, default=None)

    def profile_cap_bytes(self, config: Config) -> int | None:
        cap = config.profile.memory_cap
        if cap is None:
            return None
        f = self.facts[(config.model, self.cores_of(config))]
        return cap.resolve(f.model_bytes, f.min_budget_bytes)

    def budget_bytes(self, config: Config) -> int | None:
        """The budget in bytes as the child will resolve it (None: no budget): "min" budgets the
        way child.py does, from the smallest budget this process measured (factor 1, load()'s
        own "min" in the child, is within RSS noise of it)."""
        if config.budget is None:
            return None
        f = self.facts[(config.model, self.cores_of(config))]
        if config.budget.kind == "min":
            return min_budget_at(config.budget.value, f.min_budget_bytes)
        # "cap": the profile's cap, never one derived from the budget itself
        return config.budget.resolve(
            f.model_bytes, f.min_budget_bytes, self.profile_cap_bytes(config)
        )

    def run_config(self, config: Config, repeat: int) -> Sample:
        m = self.models[config.model]
        cap = self.cap_bytes(config)
        budget, factor = None, None
        if config.budget is not None:
            if config.budget.kind == "min":
                factor = config.budget.value
            else:
                budget = self.budget_bytes(config)
        cmd = self._child_cmd(
            m, config.strategy.name, config.strategy.load_path, budget, factor, self.matrix.passes
        )
        storage = config.profile.storage
        prepare_cache(
            storage,
            model_files(m.manifest, m.model_dir, config.strategy.name),
            model_files(m.manifest, m.model_dir),
        )
        launch = Launch(
            self.emulation,
            cores=config.profile.cores and self.cores_of(config),
            cap_bytes=cap,
            disk=m.disk,
            read_bytes_per_s=storage.read_bytes_per_s,
            tag=config.model.replace("/", "_")[-24:],
        )
        return self._spawn(launch, cmd, repeat)

    # -- the whole matrix -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        configs = expand(self.matrix)
        groups: dict[int, list[Config]] = {}
        for c in configs:
            groups.setdefault(self.cores_of(c), []).append(c)
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        interrupted = False
        with cgroups.signals_raise():
            self.prepare_models()
            self.measure_storage()
            total = len(configs) * self.matrix.repeats + len(groups) * len(self.models)
            progress = Progress(total, self.options.progress)
            try:
                for cores, group in sorted(groups.items(), reverse=True):
                    self.prepare_cores(cores, progress)
                    for repeat in range(self.matrix.repeats):
                        for c in group:
                            what = " ".join(c.key) + f" #{repeat + 1}"
                            progress.start(what)
                            s = self.run_config(c, repeat)
                            self.samples.setdefault(c.key, []).append(s)
                            progress.done(what, _summary(s))
            except KeyboardInterrupt:
                interrupted = True
                progress.note("interrupted: writing what was measured so far")
            finally:
                progress.close()
        return self.document(configs, started, interrupted)

    def record(self, config: Config):
        samples = self.samples[config.key]
        cores = self.cores_of(config)
        f = self.facts[(config.model, cores)]
        storage = config.profile.storage
        cap = self.cap_bytes(config)
        floor = self.floors.get((config.model, cores))
        whole = get_strategy(config.strategy.name).engine == "whole"
        strategy_bytes = (f.full_bytes or f.model_bytes) if whole else f.model_bytes
        budget = median(s.budget_bytes for s in samples)
        limit = min([b for b in (cap, budget) if b is not None], default=None)
        first, steady = io_floors(
            storage.cache == "cold",
            strategy_bytes,
            f.model_bytes,
            limit,
            median(s.baseline_rss_bytes for s in samples),
        )
        bw = self.bandwidth.get(storage.name, {}).get("read_bytes_per_s")
        floors = Floors(
            median(floor.steady_compute_s) if floor else None,
            first,
            seconds(first, bw),
            steady,
            seconds(steady, bw),
        )
        launch = Launch(
            self.emulation,
            cap_bytes=cap,
            disk=self.models[config.model].disk,
            read_bytes_per_s=storage.read_bytes_per_s,
        )
        fields = dict(
            model=config.model,
            label=config.strategy.label,
            strategy=config.strategy.name,
            load_path=config.strategy.load_path,
            budget=config.budget.text if config.budget else None,
            profile=config.profile.text,
            storage=storage.name,
            cache=storage.cache,
            cores=cores,
            memory_cap_bytes=cap,
            read_limit_bytes_per_s=storage.read_bytes_per_s,
            cap_enforced=launch.cap_enforced,
            throttle_enforced=launch.throttle_enforced,
            cap_from_budget=cap is not None and cap != self.profile_cap_bytes(config),
        )
        return aggregate(fields, samples, floors)

    def document(self, configs: list[Config], started: str, interrupted: bool) -> dict[str, Any]:
        m = self.matrix
        records = add_ratios([self.record(c) for c in configs if c.key in self.samples])
        return {
            "kind": KIND,
            "schema_version": SCHEMA_VERSION,
            "created": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "interrupted": interrupted,
            "command": sys.argv,
            "matrix": {
                "name": m.name,
                "models": list(m.models),
                "strategies": [s.label for s in m.strategies],
                "budgets": [b.text for b in m.budgets],
                "profiles": [p.text for p in m.profiles],
                "repeats": m.repeats,
                "passes": m.passes,
            },
            "machine": machine_info(),
            "versions": versions(),
            "emulation": self.emulation.to_json(),
            "budget_cap_margin": self.options.budget_cap_margin,
            "objective": self.options.objective,
            "warnings": self.warnings,
            "storage": self.bandwidth,
            "models": [{**f.to_json(), "cores": cores} for (_, cores), f in self.facts.items()],
            "floors": [
                {
                    "model": name,
                    "cores": cores,
                    "compute_floor_s": median(s.steady_compute_s),
                    "pipeswitch_steady_s": s.steady_median_s,
                    "sample": s,
                }
                for (name, cores), s in self.floors.items()
            ],
            "records": records,
        }


def _summary(s: Sample) -> str:
    if not s.ok:
        return ("KILLED (memory cap) " if s.oom_killed else "FAILED ") + (s.error or "")[:120]
    steady = f", steady {s.steady_median_s * 1000:.1f} ms" if s.steady_s else ""
    return f"one-shot {s.one_shot_s * 1000:.0f} ms{steady}, peak {format_bytes(s.peak_rss_bytes)}"


def run_matrix(matrix: Matrix, options: RunOptions | None = None) -> dict[str, Any]:
    """Run every configuration of `matrix`; returns the bench document (see records.py)."""
    return Runner(matrix, options or RunOptions()).run()
