"""Joining the Ray cluster and talking to its boards: `connect`, the boards to use and what each
may spend (`Board` from its probe), and calls to several boards whose failures name the board
(`ClusterError`). Ray is imported only when a cluster is asked for (extra `cluster`)."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from hermes_ort.cluster.split import Board
from hermes_ort.core.errors import BudgetError, HermesError, OptionError
from hermes_ort.core.units import format_bytes, parse_bytes

DEFAULT_TIMEOUT_S = 600.0  # a stage call that long is a board gone quiet, not a slow block


class ClusterError(HermesError):
    """A board died, left the cluster, or failed its stage: names the board and the stage."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise OptionError(
            "a cluster needs Ray: pip install 'hermes-ort[cluster]' (on every board too)"
        ) from None
    return ray


def connect(address: str) -> Any:
    """Join the Ray cluster at `address` ("auto": the one this machine's `ray start` joined)."""
    ray = import_ray()
    if not isinstance(address, str) or not address:
        raise OptionError(f"cluster must be 'auto' or 'HOST:PORT', got {address!r}")
    _reachable(address)
    if ray.is_initialized():
        joined = ray.get_runtime_context().gcs_address
        if address != "auto" and address.rpartition(":")[2] != joined.rpartition(":")[2]:
            raise ClusterError(
                f"this process is in the Ray cluster at '{joined}' already; it cannot join "
                f"'{address}' too (one cluster per process)"
            )
    else:
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ClusterError(f"cannot join the Ray cluster at '{address}': {e}") from None
    return ray


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """HOST:PORT must accept a connection within `timeout_s` (ray.init retries for minutes)."""
    if address == "auto":
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise OptionError(f"cluster must be 'auto' or 'HOST:PORT', got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterError(
            f"no Ray cluster answers at '{address}' ({e.strerror or e}): start its head with "
            f"`ray start --head --port {port}`"
        ) from None


def is_head() -> bool:
    """Whether this process runs on the cluster's head node."""
    ray = import_ray()
    node = ray.get_runtime_context().get_node_id()
    for n in ray.nodes():
        if n["NodeID"] == node:
            return "node:__internal_head__" in n.get("Resources", {})
    return False


# -- the boards -------------------------------------------------------------------------------


def alive_boards(ray, names: Sequence[str] | None) -> list[dict]:
    """The Ray nodes to use: those named (by `--node-name`), else every alive node but the head
    (unless the head is all there is)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if names is not None:
        by_name = {n["NodeName"]: n for n in nodes}
        missing = [b for b in names if b not in by_name]
        if missing:
            raise ClusterError(
                f"board(s) {missing} are not alive in the cluster; alive: {sorted(by_name)}"
            )
        return [by_name[b] for b in names]
    workers = [n for n in nodes if "node:__internal_head__" not in n.get("Resources", {})]
    return sorted(workers or nodes, key=lambda n: n["NodeName"])


def budgets_per_board(memory_budget: Any, names: list[str]) -> dict[str, int | None]:
    """Per board: bytes given, or None (what the board reports free)."""
    if isinstance(memory_budget, dict):
        unknown = sorted(set(memory_budget) - set(names))
        if unknown:
            raise OptionError(f"memory_budget names unknown board(s) {unknown}; boards: {names}")
        return {n: parse_bytes(memory_budget.get(n)) for n in names}
    if isinstance(memory_budget, str) and memory_budget.strip().lower() == "min":
        raise OptionError("memory_budget 'min' is for one board; give each board's budget")
    value = parse_bytes(memory_budget)
    return dict.fromkeys(names, value)


def measured_board(name: str, probe: dict, given: int | None) -> Board:
    """A board from its probe (`StageActor.probe`): its budget is what it was given less Ray's
    own processes there, else what it reports free; BudgetError if no stage fits in it."""
    ray_bytes = probe["ray_bytes"]
    if given is None:
        if probe["free_bytes"] is None:
            raise ClusterError(f"board '{name}' reports no free memory: give its memory_budget")
        budget, how = probe["free_bytes"], "reported free"
    else:
        budget, how = given - ray_bytes, f"given {format_bytes(given)}"
    if budget <= probe["baseline_bytes"]:
        raise BudgetError(
            f"board '{name}': memory budget {format_bytes(given or budget)} leaves "
            f"{format_bytes(budget)} after Ray's own processes there "
            f"({format_bytes(ray_bytes)}), not more than a stage's baseline "
            f"({format_bytes(probe['baseline_bytes'])})"
        )
    return Board(
        name, probe["node_id"], budget, ray_bytes, probe["baseline_bytes"], probe["cpus"], how
    )


# -- calls to the boards ----------------------------------------------------------------------


def gather(ray, refs: list, where: list[str], what: str, timeout: float = DEFAULT_TIMEOUT_S):
    """ray.get of calls to several boards, each failure named by its board (and stage)."""
    out = []
    for ref, place_ in zip(refs, where, strict=True):
        out.append(get_named(ray, ref, place_, what, timeout))
    return out


def get_named(ray, ref, where: str, what: str, timeout: float):
    """ray.get of one call to the board `where`, a failure raised as what it is, named."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(f"{where} did not {what} within {timeout:.0f} s") from None
    except ray.exceptions.RayTaskError as e:  # the stage raised: its own error, named
        cause = e.cause if isinstance(e.cause, BaseException) else e
        if isinstance(cause, HermesError):
            raise type(cause)(f"{where}: {cause}") from None
        raise ClusterError(f"{where} failed to {what}: {cause!r}") from None
    except (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError) as e:
        raise ClusterError(
            f"{where} died or left the cluster: {_first_line(e)}; place the model again on the "
            f"boards that remain (hermes_ort.load(..., cluster=...))"
        ) from None
    except ray.exceptions.RayError as e:
        raise ClusterError(f"{where}: Ray failed: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1].strip() if text else type(e).__name__
