"""What the run, generate, plan and profile commands share: the model directory and planning
options, reading an .npz of inputs, and opening a model with its notes printed as one line each
(measuring the layer profile first, in a fresh process, when asked)."""

from __future__ import annotations

import os
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

from hermes_ort.core.choices import (
    Objective,
    PageCacheMode,
    Paging,
    StrategyName,
    values,
)
from hermes_ort.core.errors import (
    InputError,
    ProfileError,
)

MODEL_DIR_HELP = "a model directory written by `hermes-ort export`"


def add_budget_and_strategy(p) -> None:
    """--budget, --strategy and --paging, as every command that opens a model takes them."""
    p.add_argument("--budget", default=None, help="memory budget, e.g. 200MB, 1.5GiB, min")
    p.add_argument(
        "--strategy",
        default="pipeload",
        choices=values(StrategyName),
        help="pipeload (default) plans within --budget; the baselines have fixed plans",
    )
    p.add_argument(
        "--paging",
        default="auto",
        choices=values(Paging),
        help="int4/int8 blocks' sessions kept open on saved packed copies, their pages dropped "
        "between runs (auto: where faster and within the budget) or re-created every pass (off)",
    )


def add_plan_options(p, objective_default: str | None) -> None:
    add_budget_and_strategy(p)
    p.add_argument(
        "--loaders", type=int, default=None, help="override the plan's loading agents (threads)"
    )
    p.add_argument(
        "--window", type=int, default=None, help="override the plan's window (blocks open at once)"
    )
    p.add_argument(
        "--objective",
        default=objective_default,
        choices=values(Objective),
        help="what pipeload's plan makes fastest: later passes or the first",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        metavar="N",
        help="rows of the batch to plan for / run (default: the manifest's sample)",
    )
    p.add_argument(
        "--page-cache",
        default="auto",
        choices=values(PageCacheMode),
        help="under a budget, drop streamed blocks' file pages after their run (auto: only where "
        "the memory cgroup or available memory has no room for the model's files)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="measure a layer profile first if none is stored (measured costs for the planner)",
    )


def read_inputs(path: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (what `np.savez` writes), or InputError naming the file."""
    try:
        data = np.load(path)  # object arrays are refused (numpy's default)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise InputError(f"--input '{path}' holds one array, expected an .npz of named arrays")
        with data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"--input '{path}' does not exist") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(
            f"--input '{path}' is not an .npz of named arrays (np.savez): {e}"
        ) from None


def load_model(model_dir: Path, **options):
    """`hermes_ort.load`, its notes (a baseline given a budget it does not honour) printed as one
    line each on stderr instead of Python's two-line warnings."""
    import hermes_ort
    from hermes_ort.runtime.model import BudgetNotHonoured

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BudgetNotHonoured)
        model = hermes_ort.load(model_dir, **options)
    for w in caught:
        if issubclass(w.category, BudgetNotHonoured):
            print(f"hermes-ort: note: {w.message}", file=sys.stderr)
        else:  # someone else's warning: as Python would show it
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return model


def load_for_generation(args):
    """`load_model` as `generate` and `chat` open a decoder: budget, strategy, paging, and the
    profile when --profile asked for one (measured first, in a fresh process)."""
    if args.profile:
        profile_first(args.model_dir)
    return load_model(
        args.model_dir,
        memory_budget=args.budget,
        strategy=args.strategy,
        paging=args.paging,
        profile=True if args.profile else None,
    )


def profile_first(model_dir: Path) -> None:
    """Measure this machine's layer profile in a fresh process when none stored matches, then
    plan from the stored one: measured in this process, the profiler's sessions would raise the
    resident set the plan starts from, and a first call would plan differently from the next."""
    import subprocess

    from hermes_ort.core.manifest import load_manifest
    from hermes_ort.planning.layer_profile import PROFILE_NAME, read_profile

    load_manifest(model_dir)  # a missing model is named as such, not as a failed measurement
    if read_profile(model_dir) is not None:
        return
    if not os.access(model_dir, os.W_OK):
        return  # nowhere to store it: load() measures it in this process, unsaved
    t0 = time.perf_counter()
    # subprocess.run, not run_child: its reader threads leave ~0.3 MB in this process's RSS, and
    # the plan's baseline must be what the next call's is (a Ctrl-C kills the child all the same)
    cmd = [sys.executable, "-m", "hermes_ort", "profile", str(model_dir)]
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        why = why.removeprefix("hermes-ort: error: ")
        raise ProfileError(f"measuring the layer profile of '{model_dir}' failed: {why}")
    if read_profile(model_dir) is None:  # load() would plan from estimates without a word
        raise ProfileError(f"the layer profile measured for '{model_dir}' was not stored")
    print(
        f"measured this machine's layer profile in {time.perf_counter() - t0:.1f} s "
        f"(stored in {model_dir / PROFILE_NAME})",
        file=sys.stderr,
    )
