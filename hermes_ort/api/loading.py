"""`hermes_ort.load`, the one public way to open a model: on this board (runtime/model.py) or
placed over the boards of a Ray cluster (cluster/, with `cluster=`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hermes_ort.core.errors import OptionError
from hermes_ort.runtime.load_options import LoadOptions, parse_load_options
from hermes_ort.runtime.model import open_model
from hermes_ort.runtime.protocol import Model

# what a cluster takes of the options (each board plans its own stage with pipeload)
CLUSTER_OPTIONS = {"memory_budget", "verify", "timeout_s"}


def load(
    model_dir: str | Path,
    memory_budget: int | str | dict[str, int | str] | None = None,
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
    cluster: str | None = None,
    boards: Sequence[str] | None = None,
    timeout_s: float | None = None,
) -> Model:
    """Open an exported model directory (`hermes-ort export` made it). Every option is checked
    before any file is read; a bad one raises OptionError naming it and its choices.

    memory_budget: bytes or a string ("512MB", "1.5GiB"); "min" = the smallest workable budget;
        None = no limit. Bounds the process's peak resident memory (RSS) during `run`; a budget
        too small for the largest block is refused, naming it and the smallest workable budget.
        Only pipeload plans under it: the baselines load what they load (the plan says so).
    strategy: "pipeload" (default) or a baseline: "full", "full-mmap", "pipeswitch", "ondemand"
        (planning/strategies.py; `hermes_ort.core.choices.StrategyName`).
    loaders, window: override the planner's number of loading agents and window.
    load_path: for the per-block baselines, "default" (ORT's default load: prepacking on) or
        "stream" (pipeload's: weights mmapped, no prepacking, read-ahead) for ablations.
    profile: None = plan with the stored profile (`hermes-ort profile`) if it matches this machine,
        else with estimates from file sizes; True = measure one now if missing; False = estimates.
    verify: "once" (default) = the sha256 of every file the strategy opens is checked before its
        first use, then cached by size, times and inode (in `verified.json`); "size" = sizes only
        (a damaged file of the right size then goes unnoticed). Both refuse paths and external
        data that leave the model directory. See docs/reliability.md.
    objective: what pipeload's plan makes fastest: "repeated" (default) = later passes (a model
        loaded once and run many times); "one-shot" = the first pass (load, run once, close).
    page_cache: under a budget, whether streamed blocks' file pages are dropped after their run
        (later passes read them from storage again) or left to the kernel: "auto" (default) drops
        them only where the process's memory cgroup or the available memory has no room for the
        model's files beside the budget (the plan says which and why); "keep", "drop" force it.
    trace: record a timeline of every load, run and free (`model.take_trace()`: Chrome
        trace-event JSON; `hermes-ort run --trace FILE`).
    paging: pipeload's prepacked streamed blocks (MatMulNBits: int4/int8), "auto" (default):
        paged where the cost model finds it faster and within the budget. A paged block's
        session is opened once, before the first pass, on a copy of the block saved with the
        weights ORT packed for this CPU (in a per-machine cache: $HERMES_ORT_PACKED_CACHE, else
        ~/.cache/hermes-ort/packed; saved once, atomically), and kept open; its packed pages are
        dropped after each run and prefetched before the next (streaming/paged.py), instead of
        its session being created and packed again every pass (SmolLM2-135M int4: 0.06 s/token
        instead of 0.54). Each keeps its session's own structures (0.1-0.4 MB) between runs,
        and opening one holds for a moment about 3x its bytes: both are counted in the budget.
        "min" is the smaller of paging and re-creating them (the pages of all of them, of all
        but those whose opening holds the most, or of none; on a tie, paging): the plan's
        reasons say which blocks are paged and why the others are not. Nothing is paged where
        the cache cannot be written or off Linux (the plan says so); a block whose copy cannot
        be saved or opened (damaged, a full disk) is re-created every pass instead, with a
        warning naming it (`hermes_ort.streaming.paged_blocks.PagingFallback`). "off": re-create
        them every pass, as before.
    cluster: None (this process) or a Ray cluster's address ("auto", "HOST:PORT"): the blocks are
        split into stages over its boards (each a Ray node started with `--node-name`), every
        stage fitting its board's budget. memory_budget is then per board: one value for each,
        or {board name: budget}; a board without one gets what it reports free. Ray's own
        processes on a board (raylet, agents; the GCS on the head) are subtracted from its
        budget. Of the other options a cluster takes `verify` and `timeout_s`.
    boards: with `cluster`, the node names to use (default: every alive node but the head).
    timeout_s: with `cluster`, how long a request may wait for a stage before it fails.

    Returns a model with `run(inputs)`, `generate(...)`, `stats`, `plan` and `close()` (a
    context manager too): `hermes_ort.runtime.model.HermesModel` on this board,
    `hermes_ort.cluster.driver.ClusterModel` over a cluster.
    """
    rest = (strategy, loaders, window, load_path, profile, verify, objective, page_cache)
    rest += (trace, paging)
    if cluster is None:
        if boards is not None or timeout_s is not None:
            raise OptionError("boards= and timeout_s= are a cluster's: give cluster= too")
        return open_model(model_dir, parse_load_options(memory_budget, *rest))
    given = parse_load_options(None, *rest)
    defaults = LoadOptions()
    if given.strategy != defaults.strategy:
        raise OptionError(f"a cluster runs pipeload stages; strategy '{strategy}' is one board's")
    one_board = sorted(
        name
        for name in (
            "loaders",
            "window",
            "load_path",
            "profile",
            "objective",
            "page_cache",
            "trace",
            "paging",
        )
        if getattr(given, name) != getattr(defaults, name)
    )
    if one_board:
        raise OptionError(
            f"option(s) {one_board} are one board's; on a cluster: {sorted(CLUSTER_OPTIONS)}"
        )
    from hermes_ort.cluster.driver import load_on_cluster

    extra = {} if timeout_s is None else {"timeout_s": timeout_s}
    return load_on_cluster(model_dir, cluster, memory_budget, boards, given.verify, **extra)
