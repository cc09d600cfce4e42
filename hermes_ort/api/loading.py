"""`hermes_ort.load`: one model directory opened on this board (model.py) or placed over the
boards of a Ray cluster (cluster.py, with `cluster=`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hermes_ort.core.errors import OptionError
from hermes_ort.runtime.model import HermesModel
from hermes_ort.runtime.model import load as load_here

if TYPE_CHECKING:
    from hermes_ort.cluster.driver import ClusterModel


def load(
    model_dir: str | Path,
    memory_budget: Any = None,
    strategy: str = "pipeload",
    cluster: str | None = None,
    boards: Sequence[str] | None = None,
    **options: Any,
) -> HermesModel | ClusterModel:
    """Open an exported model directory (see `hermes_ort.runtime.model.load` for the options).

    cluster: None (this process) or a Ray cluster's address ("auto", "HOST:PORT"): the blocks are
        split into stages over its boards (each a Ray node started with `--node-name`), every
        stage fitting its board's budget. memory_budget is then per board: one value for each,
        or {board name: budget}; a board without one gets what it reports free. Ray's own
        processes on a board (raylet, agents; the GCS on the head) are subtracted from its
        budget. boards: the node names to use (default: every alive node but the head).
    """
    if cluster is None:
        if boards is not None:
            raise OptionError("boards= names Ray nodes: give cluster= too")
        return load_here(model_dir, memory_budget, strategy, **options)
    if strategy != "pipeload":
        raise OptionError(f"a cluster runs pipeload stages; strategy '{strategy}' is one board's")
    allowed = {"verify", "timeout_s"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise OptionError(f"option(s) {unknown} are one board's; on a cluster: {sorted(allowed)}")
    from hermes_ort.cluster.driver import load_on_cluster

    return load_on_cluster(model_dir, cluster, memory_budget, boards, **options)
