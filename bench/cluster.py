"""Several boards: one model over a local Ray cluster of emulated boards, against one board.

    python -m bench cluster --decoder models/peers/tinyllama-1.1b/hermes-fp32 \
        --encoder models/peers/bert-large/hermes-fp32 --boards 2,4 --share 0.6 --storage sd \
        --out bench/results/latest/cluster

Each board is a Ray node (`ray start --address ... --node-name board-N`, on 127.0.0.1) started
inside its own memory cgroup capped at the board's budget (Ray's own processes there included)
and blkio group reading at the storage profile's rate, pinned to one core (boards beyond the
machine's cores share them: said in the report). The head runs outside any cap (the caller's
machine). The model's files are evicted from the page cache before each placement, so every
board reads its stage through its throttle.

One board, side by side in the same run (fresh processes, same core count, same throttle): the
compute floor (`full`, everything resident, warm, one core) and one board streaming the model
under its own budget (`pipeload`, the cap, the throttle).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import cgroups, child_env
from bench.device import Emulation, Launch
from bench.matrix import STORAGE
from hermes_ort.core.manifest import load_manifest
from hermes_ort.core.units import format_bytes
from hermes_ort.streaming.memory import drop_file_cache

PORT = 6390
OBJECT_STORE = 80 << 20  # per node: activations are KBs to a few MB
PROMPT = [
    1,
    450,
    4996,
    17354,
    1701,
    29916,
    432,
    17204,
    975,
    278,
    17366,
    11203,
    29889,
    450,
    3974,
    338,
]  # 16 ids
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _env() -> dict[str, str]:
    return {**child_env(), **RAY_ENV}


def evict(model_dir: Path) -> None:
    for f in load_manifest(model_dir).all_files():
        drop_file_cache(str(model_dir / f))


class Boards:
    """A head and `count` boards, each in its cgroups; `with Boards(...) as b:` then b.address.
    Always stopped (`ray stop`) and its groups removed."""

    def __init__(self, count: int, cap: int | None, rate: int | None, disk, emulation: Emulation):
        self.count, self.cap, self.rate, self.disk = count, cap, rate, disk
        self.emulation = emulation
        self.launches: list[Launch] = []
        # `ray start` nodes join on this machine's own address (ray rewrites 127.0.0.1 to it for
        # multi-node clusters); traffic to a local address stays on the loopback device
        from ray._private.services import get_node_ip_address

        self.address = f"{get_node_ip_address()}:{PORT}"
        self.memory: list[Any] = []

    def __enter__(self) -> Boards:
        subprocess.run([_ray_bin(), "stop", "--force"], capture_output=True, env=_env())
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        common = [
            "--object-store-memory",
            str(OBJECT_STORE),
            "--disable-usage-stats",
        ]
        head = [
            _ray_bin(),
            "start",
            "--head",
            "--port",
            str(PORT),
            "--num-cpus",
            "0",
            "--include-dashboard",
            "false",
            *common,
        ]
        subprocess.run(head, check=True, capture_output=True, env=_env())
        cpus = self.emulation.cpus
        for i in range(self.count):
            em = replace(self.emulation, cpus=(cpus[i % len(cpus)],))
            launch = Launch(em, 1, self.cap, self.disk, self.rate, tag=f"board{i}")
            launch.__enter__()
            self.launches.append(launch)
            cmd = [
                _ray_bin(),
                "start",
                "--address",
                self.address,
                "--node-name",
                f"board-{i}",
                "--num-cpus",
                "1",
                *common,
            ]
            subprocess.run(
                cmd, check=True, capture_output=True, env=_env(), preexec_fn=launch.preexec
            )
        _wait_for_nodes(self.address, self.count + 1)

    def peaks(self) -> list[int | None]:
        """Each board's cgroup peak so far (memory.max_usage_in_bytes)."""
        out = []
        for launch in self.launches:
            group = next((g for g in launch._groups if isinstance(g, cgroups.MemoryGroup)), None)
            out.append(group.stats().peak_bytes if group else None)
        return out

    def __exit__(self, *exc) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([_ray_bin(), "stop", "--force"], capture_output=True, env=_env())
        for launch in self.launches:
            launch.__exit__(None, None, None)
            self.memory.append(launch.memory)
        self.launches.clear()


def _wait_for_nodes(address: str, count: int, timeout_s: float = 60) -> None:
    import ray

    os.environ.update(RAY_ENV)
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    deadline = time.monotonic() + timeout_s
    while sum(n["Alive"] for n in ray.nodes()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sum(n['Alive'] for n in ray.nodes())} of {count} nodes up")
        time.sleep(0.5)


# -- over the boards -----------------------------------------------------------------------------
def on_boards(args, count: int, share: float, emulation: Emulation, disk) -> dict[str, Any]:
    import hermes_ort

    rate = STORAGE[args.storage].read_bytes_per_s
    out: dict[str, Any] = {
        "boards": count,
        "share": share,
        "cores_per_board": 1,
        "shared_cores": count > len(emulation.cpus),
    }
    for kind, model_dir in (("decoder", args.decoder), ("encoder", args.encoder)):
        if model_dir is None:
            continue
        budget = int(share * load_manifest(model_dir).blocks_bytes)
        with Boards(count, budget, rate, disk, emulation) as boards:
            evict(model_dir)
            t0 = time.perf_counter()
            model = hermes_ort.load(model_dir, cluster=boards.address, memory_budget=budget)
            placed_s = time.perf_counter() - t0
            rec: dict[str, Any] = {
                "model": str(model_dir),
                "budget_bytes": budget,
                "place_s": placed_s,
                "split": model.plan.to_json(),
            }
            with model:
                rec.update(_decode(model, args) if kind == "decoder" else _encode(model, args))
                rec["stage_stats"] = model.stage_stats()
            rec["cgroup_peak_bytes"] = boards.peaks()
        rec["oom_kills"] = [m.oom_kills if m else None for m in boards.memory]
        out[kind] = rec
        print(f"{count} boards, {kind}: {json.dumps(_brief(rec))}", flush=True)
    return out


def _decode(model, args) -> dict[str, Any]:
    model.generate(PROMPT[:4], 2, eos_token_id=[])  # first passes: the stages' sessions warm
    one, stages = [], []
    for _ in range(args.repeats):
        model.generate(PROMPT, args.new_tokens, eos_token_id=[])
        one.append(model.generation_stats)
        stages.append(sum(st["latency_s"] for st in model.stage_stats()))  # the last token's
    many = []
    for _ in range(args.repeats):
        model.generate([PROMPT] * args.prompts, args.new_tokens, eos_token_id=[])
        many.append(model.generation_stats)
    per_token = statistics.median(1 / s.decode_tokens_per_s for s in one)
    return {
        "per_token_s": per_token,
        "tokens_per_s_one": statistics.median(s.decode_tokens_per_s for s in one),
        "tokens_per_s_in_flight": statistics.median(s.decode_tokens_per_s for s in many),
        "prompts_in_flight": args.prompts,
        "first_token_s": statistics.median(s.time_to_first_token_s for s in one),
        "stages_sum_s": statistics.median(stages),
    }


def _encode(model, args) -> dict[str, Any]:
    one = model.sample_inputs(batch_size=1)
    t0 = time.perf_counter()
    model.run(one)
    first = time.perf_counter() - t0
    steady = []
    for _ in range(args.repeats + 2):
        t0 = time.perf_counter()
        model.run(one)
        steady.append(time.perf_counter() - t0)
    batch = model.sample_inputs(batch_size=args.prompts * 2)
    t0 = time.perf_counter()
    model.run_many([model.sample_inputs(batch_size=1, seed=s) for s in range(args.prompts * 2)])
    many_s = time.perf_counter() - t0
    del batch
    return {
        "first_pass_s": first,
        "steady_s": statistics.median(steady),
        "sequences_per_s_one": 1 / statistics.median(steady),
        "sequences_per_s_in_flight": args.prompts * 2 / many_s,
        "in_flight": args.prompts * 2,
    }


def _brief(rec: dict) -> dict:
    keep = (
        "place_s",
        "per_token_s",
        "tokens_per_s_one",
        "tokens_per_s_in_flight",
        "first_pass_s",
        "steady_s",
        "sequences_per_s_one",
        "sequences_per_s_in_flight",
    )
    return {k: round(rec[k], 4) for k in keep if k in rec}


# -- one board ---------------------------------------------------------------------------------
def one_board(args, emulation: Emulation, disk) -> dict[str, Any]:
    """The compute floor (full, warm, one core, no cap) and one board streaming under its budget
    (pipeload, capped, throttled, one core), each a fresh `hermes-ort` process."""
    rate = STORAGE[args.storage].read_bytes_per_s
    em = replace(emulation, cpus=emulation.cpus[:1])
    out: dict[str, Any] = {}
    if args.decoder is not None:
        blocks = load_manifest(args.decoder).blocks_bytes
        ids = ",".join(map(str, PROMPT))
        floor = _child(
            em,
            None,
            None,
            disk,
            [
                "generate",
                str(args.decoder),
                "--ids",
                ids,
                "--max-new-tokens",
                str(args.new_tokens),
                "--strategy",
                "full",
                "--eos",
                "-1",
                "--json",
            ],
            warm=args.decoder,
        )
        budget = int(args.stream_share * blocks)
        streamed = _child(
            em,
            budget,
            rate,
            disk,
            [
                "generate",
                str(args.decoder),
                "--ids",
                ids,
                "--max-new-tokens",
                str(args.stream_new_tokens),
                "--budget",
                str(budget),
                "--eos",
                "-1",
                "--json",
            ],
            evicted=args.decoder,
        )
        out["decoder"] = {
            "compute_floor_per_token_s": 1 / floor["decode_tokens_per_s"],
            "stream_budget_bytes": budget,
            "stream_per_token_s": 1 / streamed["decode_tokens_per_s"]
            if streamed.get("decode_tokens_per_s")
            else None,
            "stream_peak_rss_bytes": streamed.get("peak_rss_bytes"),
        }
        print(f"one board, decoder: {out['decoder']}", flush=True)
    if args.encoder is not None:
        blocks = load_manifest(args.encoder).blocks_bytes
        budget = int(args.share * blocks)
        streamed = _child(
            em,
            budget,
            rate,
            disk,
            [
                "run",
                str(args.encoder),
                "--budget",
                str(budget),
                "--repeat",
                str(args.repeats + 1),
                "--json",
            ],
            evicted=args.encoder,
        )
        floor = _child(
            em,
            None,
            None,
            disk,
            [
                "run",
                str(args.encoder),
                "--strategy",
                "full",
                "--repeat",
                str(args.repeats + 1),
                "--json",
            ],
            warm=args.encoder,
        )
        runs = [r["latency_s"] for r in streamed["runs"]]
        out["encoder"] = {
            "budget_bytes": budget,
            "stream_first_pass_s": runs[0],
            "stream_steady_s": statistics.median(runs[1:]),
            "compute_floor_s": statistics.median(r["latency_s"] for r in floor["runs"][1:]),
        }
        print(f"one board, encoder: {out['encoder']}", flush=True)
    return out


def _child(em, cap, rate, disk, argv, warm=None, evicted=None) -> dict:
    if evicted is not None:
        evict(evicted)
    if warm is not None:
        for f in load_manifest(warm).all_files():
            with open(Path(warm) / f, "rb") as fh:
                while fh.read(16 << 20):
                    pass
    cmd = [sys.executable, "-m", "hermes_ort", *argv]
    with Launch(em, 1, cap, disk, rate, tag="oneboard") as launch:
        p = subprocess.run(
            cmd, capture_output=True, text=True, env=_env(), preexec_fn=launch.preexec, timeout=3600
        )
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1:], "returncode": p.returncode}
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- the report ----------------------------------------------------------------------------------
def render(doc: dict) -> str:
    lines = [
        f"# hermes-ort over several boards ({doc['created']})",
        "",
        f"Machine: {doc['machine']}. Storage `{doc['storage']}` on every board; each board's "
        "budget is a share of the model and its memory cgroup's cap (Ray's own processes there "
        f"inside it); one core per board. Command: `{doc['command']}`",
        "",
    ]
    one = doc["one_board"]
    if "decoder" in one:
        d1 = one["decoder"]
        floor = d1["compute_floor_per_token_s"]
        lines += [
            "## Decoder (per token, 16-token prompt)",
            "",
            "| configuration | per token | vs compute floor | sum of stages | tokens/s, 1 prompt "
            f"| tokens/s, {doc['prompts']} in flight | in flight / 1 | Ray per board | "
            "cgroup peak per board |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| one board, `full` resident, warm (compute floor) | {floor:.3f} s | 1.00x | - | "
            f"{1 / floor:.2f} | - | - | - | - |",
        ]
        s = d1.get("stream_per_token_s")
        lines.append(
            f"| one board streaming, budget {format_bytes(d1['stream_budget_bytes'])} | "
            + (f"{s:.2f} s | {s / floor:.1f}x |" if s else "failed | - |")
            + " - | - | - | - | - | - |"
        )
        for r in doc["runs"]:
            d = r.get("decoder")
            if not d:
                continue
            ray_mb = "/".join(f"{s['ray_bytes'] / 1e6:.0f}" for s in d["split"]["stages"])
            peaks = "/".join(format_bytes(p) for p in d["cgroup_peak_bytes"])
            shared = " (cores shared)" if r["shared_cores"] else ""
            budget = format_bytes(d["budget_bytes"])
            lines.append(
                f"| {r['boards']} boards{shared}, {budget} each | {d['per_token_s']:.3f} s | "
                f"{d['per_token_s'] / floor:.2f}x | {d['stages_sum_s']:.3f} s | "
                f"{d['tokens_per_s_one']:.2f} | "
                f"{d['tokens_per_s_in_flight']:.2f} | "
                f"{d['tokens_per_s_in_flight'] / d['tokens_per_s_one']:.2f}x | {ray_mb} MB | "
                f"{peaks} |"
            )
        lines.append("")
    if "encoder" in one:
        e1 = one["encoder"]
        lines += [
            "## Encoder (one sequence)",
            "",
            "| configuration | first pass (placement excluded) | steady pass | "
            "sequences/s in flight | Ray per board | cgroup peak per board |",
            "|---|---|---|---|---|---|",
            f"| one board, `full`, warm (compute floor) | - | {e1['compute_floor_s']:.3f} s "
            "| - | - | - |",
            f"| one board streaming, budget {format_bytes(e1['budget_bytes'])} | "
            f"{e1['stream_first_pass_s']:.2f} s | {e1['stream_steady_s']:.2f} s | - | - | - |",
        ]
        for r in doc["runs"]:
            e = r.get("encoder")
            if not e:
                continue
            ray_mb = "/".join(f"{s['ray_bytes'] / 1e6:.0f}" for s in e["split"]["stages"])
            peaks = "/".join(format_bytes(p) for p in e["cgroup_peak_bytes"])
            lines.append(
                f"| {r['boards']} boards, {format_bytes(e['budget_bytes'])} each (placed in "
                f"{e['place_s']:.1f} s) | "
                f"{e['first_pass_s']:.3f} s | {e['steady_s']:.3f} s | "
                f"{e['sequences_per_s_in_flight']:.2f} ({e['in_flight']} in flight; 1 at a "
                f"time {e['sequences_per_s_one']:.2f}) | {ray_mb} MB | {peaks} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> Path | None:
    """Per-token latency (log scale) of the decoder: one board streaming, the compute floor, and
    each board count, one prompt at a time and per token of the prompts in flight."""
    from bench.plots import _pyplot

    one = doc["one_board"].get("decoder")
    runs = [r for r in doc["runs"] if r.get("decoder")]
    if not one or not runs:
        return None
    plt = _pyplot()
    labels = ["1 board\nstreaming", "1 board\nall resident"]
    values = [one.get("stream_per_token_s") or 0.0, one["compute_floor_per_token_s"]]
    for r in runs:
        d = r["decoder"]
        labels.append(f"{r['boards']} boards\n1 prompt")
        values.append(d["per_token_s"])
        labels.append(f"{r['boards']} boards\n{d['prompts_in_flight']} in flight")
        values.append(1 / d["tokens_per_s_in_flight"])
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(
        range(len(values)), values, color=["grey", "black"] + ["tab:blue"] * (len(values) - 2)
    )
    ax.set_yscale("log")
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel("seconds per token (log)")
    ax.set_title(f"{Path(runs[0]['decoder']['model']).parent.name}: one model over emulated boards")
    for b, v in zip(bars, values, strict=True):
        ax.annotate(
            f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decoder", type=Path, default=None)
    p.add_argument("--encoder", type=Path, default=None)
    p.add_argument(
        "--boards",
        default="2:0.6,4:0.4",
        help="board counts and each board's budget as a share of the model: N:SHARE,...",
    )
    p.add_argument("--share", type=float, default=0.6, help="one board's budget share (encoder)")
    p.add_argument("--stream-share", type=float, default=0.5, help="one board's budget share")
    p.add_argument("--storage", default="sd", choices=tuple(STORAGE))
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--stream-new-tokens", type=int, default=3)
    p.add_argument("--prompts", type=int, default=4, help="prompts in flight")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results/cluster"))
    p.add_argument("--render", type=Path, default=None, metavar="JSON", help="render again, stop")
    p.add_argument(
        "--one-board-from",
        type=Path,
        default=None,
        metavar="JSON",
        help="take the one-board figures from an earlier cluster.json (same machine, same models)",
    )


def run(args) -> int:
    from bench.cgroups import disk_of
    from hermes_ort.core.machine import cpu_name

    if shutil.which(_ray_bin()) is None:
        print("bench cluster: Ray is not installed (pip install '.[cluster]')", file=sys.stderr)
        return 2
    if args.render is not None:
        doc = json.loads(args.render.read_text())
        (args.render.parent / "cluster.md").write_text(render(doc))
        plot(doc, args.render.parent / "cluster.png")
        print(render(doc))
        return 0
    emulation = Emulation.detect()
    model = args.decoder or args.encoder
    if model is None:
        print("bench cluster: give --decoder and/or --encoder", file=sys.stderr)
        return 2
    disk = disk_of(model)
    doc: dict[str, Any] = {
        "kind": "cluster",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "command": " ".join(sys.argv),
        "storage": args.storage,
        "share": args.share,
        "prompts": args.prompts,
        "emulation": emulation.to_json(),
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every phase: a long run cut short keeps what it measured
        (args.out / "cluster.json").write_text(json.dumps(doc, indent=1))

    if args.one_board_from is not None:  # the one-board side of an earlier run of this command
        doc["one_board"] = json.loads(args.one_board_from.read_text())["one_board"]
        doc["one_board_from"] = str(args.one_board_from)
    else:
        doc["one_board"] = one_board(args, emulation, disk)
    save()
    counts = [
        (int(c), float(sh or args.share))
        for c, _, sh in (x.partition(":") for x in args.boards.split(","))
    ]
    doc["runs"] = []
    for n, sh in counts:
        doc["runs"].append(on_boards(args, n, sh, emulation, disk))
        save()
    (args.out / "cluster.md").write_text(render(doc))
    plot(doc, args.out / "cluster.png")
    print(render(doc))
    return 0
