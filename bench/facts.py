"""The measured facts the design rests on (docs/design.md cites them), each in a fresh process:

    python -m bench facts models/bert-base --out bench/results/latest/facts

- sessions: one layer block opened each way the strategies open blocks (ORT's default, prepacked
  with the blocks' export-time optimisation, mmapped without prepacking): create, first and
  steady run, resident bytes after its run (anonymous and file-backed);
- pools: session creation on 1 and 2 threads, and a run right after 3 other sessions ran (as in
  a pass), with ORT's spinning thread pools and with spinning off (what every strategy uses);
- trim: what a destroyed prepacked session leaves in the heap until malloc_trim;
- readahead: cold reads of the layers' files by 2 agents, with sequential and with random advice
  (large vs small page-cache folios), and a warm read-ahead (every page cached);
- embedding: the prologue's resident bytes after one lookup of 128 random ids, its table read
  ahead in large (sequential) or small (random) folios.

Writes facts.json and facts.md; a Markdown table on stdout."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

KINDS = ("sessions", "pools", "trim", "readahead", "embedding")
REPEATS = 5


# -- in the child ----------------------------------------------------------------------------------
def _setup(model_dir: Path):
    import hermes_ort
    from hermes_ort.streaming.integrity import Verifier

    manifest = hermes_ort.load_manifest(model_dir)
    layers = [i for i, b in enumerate(manifest.blocks) if b.kind == "layers"]
    return manifest, layers, Verifier(model_dir, "size")


def _inputs(model_dir: Path, manifest, index: int) -> dict:
    """Real inputs of block `index`: the blocks before it run once on the sample."""
    from hermes_ort.core.settings import STREAMING
    from hermes_ort.streaming.sessions import create_session
    from hermes_ort.tensors.dataflow import Tensors
    from hermes_ort.tensors.inputs import sample_inputs

    tensors = Tensors(manifest, sample_inputs(manifest))
    for i in range(index):
        spec = manifest.blocks[i]
        s = create_session(model_dir / spec.path, STREAMING)
        tensors.put(i, s.run(list(spec.outputs), tensors.inputs_of(i)))
        del s
    return tensors.inputs_of(index)


def _timed(fn) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def child_sessions(model_dir: Path) -> dict:
    from hermes_ort.core.settings import ORT_DEFAULT, PREPACKED_STREAMING, STREAMING
    from hermes_ort.streaming.memory import drop_file_cache, rss_breakdown, trim_heap
    from hermes_ort.streaming.readahead import warm_files
    from hermes_ort.streaming.sessions import create_session

    manifest, layers, _ = _setup(model_dir)
    k = layers[len(layers) // 2]
    spec = manifest.blocks[k]
    feeds = _inputs(model_dir, manifest, k)
    names = list(spec.outputs)
    files = [model_dir / f.path for f in spec.files]
    out = {"block": spec.name, "file_bytes": spec.bytes}
    modes = {"ORT default": ORT_DEFAULT, "prepacked": PREPACKED_STREAMING, "mmapped": STREAMING}
    for label, settings in modes.items():
        creates, firsts, runs, anon, file = [], [], [], [], []
        for _ in range(REPEATS):
            warm_files(files)
            trim_heap()
            before = rss_breakdown()
            t, s = _timed(lambda settings=settings: create_session(model_dir / spec.path, settings))
            creates.append(t)
            firsts.append(_timed(lambda s=s: s.run(names, feeds))[0])
            runs.append(
                statistics.median(_timed(lambda s=s: s.run(names, feeds))[0] for _ in "123")
            )
            after = rss_breakdown()
            anon.append(after["anon"] - before["anon"])
            file.append(after["file"] - before["file"])
            del s
            for f in files:
                drop_file_cache(str(f))
        out[label] = {
            "create_s": statistics.median(creates),
            "first_run_s": statistics.median(firsts),
            "run_s": statistics.median(runs),
            "anon_bytes": int(statistics.median(anon)),
            "file_bytes": int(statistics.median(file)),
        }
    return out


def _options(spinning: bool, threads: int = 0):
    import onnxruntime as ort

    from hermes_ort.core.settings import PREPACKED_STREAMING
    from hermes_ort.streaming.sessions import session_options

    # prepacked, as ORT loads a block by default (the load worth spreading over agents); spinning:
    # ORT's own thread pools, as a user of plain ORT gets them
    opts = session_options(PREPACKED_STREAMING) if not spinning else ort.SessionOptions()
    if spinning:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def child_pools(model_dir: Path) -> dict:
    import onnxruntime as ort

    manifest, layers, _ = _setup(model_dir)
    specs = [manifest.blocks[i] for i in layers[:8]]
    k = layers[len(layers) // 2]
    feeds = _inputs(model_dir, manifest, k)
    names = list(manifest.blocks[k].outputs)
    out = {}
    for spinning in (True, False):

        def create(spec, spinning=spinning):
            return ort.InferenceSession(
                str(model_dir / spec.path), _options(spinning), providers=["CPUExecutionProvider"]
            )

        serial, _ = _timed(lambda: [create(s) for s in specs])
        holder: list = []

        def parallel(create=create, holder=holder):
            ts = [
                threading.Thread(
                    target=lambda part=part, out=holder: out.extend(create(s) for s in part)
                )
                for part in (specs[0::2], specs[1::2])
            ]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        together, _ = _timed(parallel)
        holder.clear()
        session = create(manifest.blocks[k])

        def once(session=session):
            return _timed(lambda: session.run(names, feeds))[0]

        alone = statistics.median(once() for _ in range(7))
        others = [(create(s), s) for s in specs[:3]]
        other_feeds = [_inputs(model_dir, manifest, layers[j]) for j in range(3)]
        beside = []
        for _ in range(7):  # as in a pass: the blocks before it have just run
            for (o, spec), f in zip(others, other_feeds, strict=True):
                o.run(list(spec.outputs), f)
            beside.append(once())
        beside = statistics.median(beside)
        others = session = None
        out["spinning" if spinning else "not spinning"] = {
            "create_1_thread_s": serial,
            "create_2_threads_s": together,
            "run_alone_s": alone,
            "run_after_3_others_s": beside,
        }
    return out


def child_trim(model_dir: Path) -> dict:
    from hermes_ort.core.settings import ORT_DEFAULT, PREPACKED_STREAMING
    from hermes_ort.streaming.memory import rss_bytes, trim_heap
    from hermes_ort.streaming.sessions import create_session

    manifest, layers, _ = _setup(model_dir)
    k = layers[len(layers) // 2]
    spec = manifest.blocks[k]
    feeds = _inputs(model_dir, manifest, k)
    out: dict[str, Any] = {"block": spec.name}
    for label, settings in (("own arena", ORT_DEFAULT), ("shared arena", PREPACKED_STREAMING)):
        trim_heap()
        base = rss_bytes()
        s = create_session(model_dir / spec.path, settings)
        s.run(list(spec.outputs), feeds)
        live = rss_bytes() - base
        del s
        freed = rss_bytes() - base
        trim_heap()
        out[label] = {
            "live_bytes": live,
            "after_del_bytes": freed,
            "after_trim": rss_bytes() - base,
        }
    return out


def _cold(paths) -> None:
    from hermes_ort.streaming.memory import drop_file_cache

    os.sync()
    for p in paths:
        drop_file_cache(str(p))


def child_readahead(model_dir: Path) -> dict:
    from hermes_ort.streaming.readahead import read_ahead

    manifest, layers, _ = _setup(model_dir)
    files = [
        model_dir / f.path
        for i in layers
        for f in manifest.blocks[i].files
        if f.path.endswith(".data")
    ]
    out: dict[str, Any] = {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    for label, sequential in (("sequential advice", True), ("random advice", False)):
        _cold(files)
        halves = (files[0::2], files[1::2])

        def agents(sequential=sequential, halves=halves):
            ts = [
                threading.Thread(target=lambda h=h: [read_ahead(str(p), sequential) for p in h])
                for h in halves
            ]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        seconds, _ = _timed(agents)
        out[label] = {"seconds": seconds, "bytes_per_s": out["bytes"] / seconds}
    warm = [_timed(lambda: read_ahead(str(files[0])))[0] for _ in range(REPEATS)]
    out["warm read-ahead of one cached block"] = {
        "seconds": statistics.median(warm),
        "file_bytes": files[0].stat().st_size,
    }
    return out


def child_embedding(model_dir: Path) -> dict:
    import numpy as np

    from hermes_ort.core.settings import STREAMING
    from hermes_ort.streaming.memory import rss_breakdown
    from hermes_ort.streaming.readahead import read_ahead
    from hermes_ort.streaming.sessions import create_session

    manifest, _, _ = _setup(model_dir)
    spec = manifest.blocks[0]
    feeds = _inputs(model_dir, manifest, 0)
    ids = next(k for k in feeds if k.endswith("input_ids"))
    vocab = next(t.sample["high"] for t in manifest.inputs if t.name == ids)
    feeds[ids] = np.random.default_rng(0).integers(0, vocab, feeds[ids].shape).astype(np.int64)
    paths = [model_dir / f.path for f in spec.files]
    out = {"block": spec.name, "file_bytes": spec.bytes, "ids": int(feeds[ids].size)}
    for label, sequential in (("large folios (sequential)", True), ("small folios", False)):
        _cold(paths)
        for p in paths:
            read_ahead(str(p), sequential)
        before = rss_breakdown()["file"]
        s = create_session(model_dir / spec.path, STREAMING)
        s.run(list(spec.outputs), feeds)
        out[label] = {"resident_file_bytes": rss_breakdown()["file"] - before}
        del s
    return out


CHILDREN = {
    "sessions": child_sessions,
    "pools": child_pools,
    "trim": child_trim,
    "readahead": child_readahead,
    "embedding": child_embedding,
}


# -- the parent ------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path, nargs="?", default=Path("models/bert-base"))
    p.add_argument("--kinds", default=",".join(KINDS), help=f"of {', '.join(KINDS)}")
    p.add_argument("--out", type=Path, default=Path("bench/results/latest/facts"))
    p.add_argument("--render", action="store_true", help="render OUT/facts.json again")


def run(args) -> int:
    from bench import child_env
    from bench.models import ensure_exported
    from hermes_ort.measure.fresh_process import require, run_child

    path = args.out / "facts.json"
    if args.render:
        doc = json.loads(path.read_text())
    else:
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown facts {unknown} (choose from {', '.join(KINDS)})")
        ensure_exported(args.model_dir.name, args.model_dir)
        from bench.records import machine_info, versions

        doc = {"model": str(args.model_dir), "machine": machine_info(), "versions": versions()}
        for kind in kinds:
            cmd = [sys.executable, "-m", "bench.facts", kind, str(args.model_dir)]
            record = require(run_child(cmd, 1800, env=child_env()), f"facts '{kind}'")
            doc[kind] = {k: v for k, v in record.items() if k != "ok"}
            print(f"{kind}: {json.dumps(doc[kind])}", file=sys.stderr, flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
    table = render(doc)
    (args.out / "facts.md").write_text(table)
    print(table)
    return 0


def _ms(s: float) -> str:
    return f"{s * 1000:.1f} ms"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def render(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        f"# Measured facts: {Path(doc['model']).name}",
        "",
        f"{m['cpu']}, {m['cores']} cores, onnxruntime {doc['versions']['onnxruntime']}; "
        "each kind in a fresh process (`python -m bench facts`).",
    ]
    if "sessions" in doc:
        s = doc["sessions"]
        lines += [
            "",
            f"Sessions of `{s['block']}` ({_mb(s['file_bytes'])}), medians of {REPEATS}:",
            "",
            "| opened | create | 1st run | run | anon after run | file-backed |",
            "|---|---|---|---|---|---|",
        ]
        for label in ("ORT default", "prepacked", "mmapped"):
            r = s[label]
            lines.append(
                f"| {label} | {_ms(r['create_s'])} | {_ms(r['first_run_s'])} | {_ms(r['run_s'])} "
                f"| {_mb(r['anon_bytes'])} | {_mb(r['file_bytes'])} |"
            )
    if "pools" in doc:
        lines += [
            "",
            "Thread pools (8 layer sessions created; a run alone / right after 3 other",
            "sessions ran, as in a pass):",
            "",
            "| pools | create, 1 thread | create, 2 threads | run alone | run after 3 others |",
            "|---|---|---|---|---|",
        ]
        for label, r in doc["pools"].items():
            lines.append(
                f"| {label} | {_ms(r['create_1_thread_s'])} | {_ms(r['create_2_threads_s'])} "
                f"| {_ms(r['run_alone_s'])} | {_ms(r['run_after_3_others_s'])} |"
            )
    if "trim" in doc:
        t = doc["trim"]
        for label in ("own arena", "shared arena"):
            r = t[label]
            lines += [
                "",
                f"A prepacked `{t['block']}` ({label}) destroyed: {_mb(r['live_bytes'])} live, "
                f"{_mb(r['after_del_bytes'])} still resident after `del`, "
                f"{_mb(r['after_trim'])} after `malloc_trim(0)`.",
            ]
    if "readahead" in doc:
        r = doc["readahead"]
        seq, rnd = r["sequential advice"], r["random advice"]
        warm = r["warm read-ahead of one cached block"]
        lines += [
            "",
            f"Read-ahead, {r['files']} layer files ({_mb(r['bytes'])}) cold, 2 agents: "
            f"sequential advice {seq['bytes_per_s'] / 1e9:.2f} GB/s, random advice "
            f"{rnd['bytes_per_s'] / 1e9:.2f} GB/s; one cached block "
            f"({_mb(warm['file_bytes'])}) {_ms(warm['seconds'])}.",
        ]
    if "embedding" in doc:
        e = doc["embedding"]
        big, small = e["large folios (sequential)"], e["small folios"]
        lines += [
            "",
            f"Embedding lookup of {e['ids']} random ids in `{e['block']}` "
            f"({_mb(e['file_bytes'])}): {_mb(big['resident_file_bytes'])} resident after a "
            f"sequential read-ahead, {_mb(small['resident_file_bytes'])} after one in small "
            "folios.",
        ]
    return "\n".join(lines) + "\n"


def _child(argv: list[str]) -> dict:
    kind, model_dir = argv[0], Path(argv[1])
    return CHILDREN[kind](model_dir)


if __name__ == "__main__":
    from hermes_ort.measure.fresh_process import child_main

    sys.exit(child_main(_child))
