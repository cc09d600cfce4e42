"""Paged blocks against resident and streamed ones on a real decoder (issue #24), each mechanism in
a fresh process (in its own memory cgroup where there is one, capped with --cap-mb):

    python -m bench paged [MODEL_DIR] --tokens 16 --out bench/results/latest/paged

A greedy decode loop over every block of the model (a prompt pass, then one token per pass with the
KV cache), run by:
- resident: every block's session open, prepacked (ORT's packed weights in anonymous memory);
- streamed: per block and pass, a prepacked session created, run and destroyed (what streaming a
  MatMulNBits block costs today: it is re-packed on every token);
- paged: every block's session open from its saved packed copy (streaming/paged.py); each block's
  pages dropped after it runs and its packed copies prefetched `--ahead` blocks ahead, both on a
  worker thread; the page cache keeps the files (reclaimable);
- streamed-mapped (asked for by name): streamed with prepacking off, the weights mmapped (how
  fp32 blocks stream today; MatMulNBits would dequantize its whole weight on every call);
- streamed-cold, paged-cold: the same, and each block's files dropped from the page cache after
  its run: every token reads them from storage again (what a budget that caches none of them
  costs; the engine's daemon drops a streamed block's own files so under a budget).
All use the same session settings (PREPACKED_STREAMING: no spinning pools, one shared arena,
blocks optimised at export) and threads. Per mechanism: seconds per token (median; raw samples
kept), the prompt pass, the time to open every block (and to save the packed copies once), peak
RSS of the child (the kernel's maxrss) and during the decode (VmHWM reset after opening), RSS
while decoding split into anonymous and file-backed (highest sampled), the anonymous bytes each
block keeps while not running, the cgroup's peak (RSS + page cache charged), and the tokens, which
must equal across mechanisms.

Writes NAME.json (one record per mechanism) and NAME.md; prints the table. Timings are taken
beside whatever else runs on the machine."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MECHANISMS = ("resident", "streamed", "paged", "streamed-cold", "paged-cold")
EXTRA = ("streamed-mapped",)  # prepacking off (STREAMING): today's way for fp32 blocks
DEFAULT_MODEL = Path.home() / ".cache" / "hermes-ort" / "models" / "smollm2-135m-instruct"
SAMPLE_S = 0.005


# -- in the child ----------------------------------------------------------------------------------
def _status() -> dict[str, int]:
    """RssAnon, RssFile, VmRSS, VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


class _Sampler:
    """The highest RssAnon and RssFile seen, sampled on a thread."""

    def __init__(self):
        self.high = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = _status()
            for k in self.high:
                self.high[k] = max(self.high[k], now[k])
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _prompt(manifest, tokens: int) -> dict:
    import numpy as np

    from hermes_ort.tensors.kv_cache import decoder_signature

    sig = decoder_signature(manifest)
    vocab = next(s for s in manifest.inputs if s.name == "input_ids").sample.get("high", 1000)
    ids = np.random.default_rng(0).integers(0, vocab, (1, tokens), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, tokens), np.int64)}
    feeds.update(sig.empty_cache())
    if sig.takes_position_ids:
        feeds["position_ids"] = np.arange(tokens, dtype=np.int64)[None]
    return feeds


def _next_feeds(sig, feeds: dict, outputs: dict, token: int) -> dict:
    import numpy as np

    past = feeds["attention_mask"].shape[1]
    nxt = {
        "input_ids": np.array([[token]], np.int64),
        "attention_mask": np.ones((1, past + 1), np.int64),
        **{s.past: outputs[s.present] for s in sig.slots},
    }
    if sig.takes_position_ids:
        nxt["position_ids"] = np.array([[past]], np.int64)
    return nxt


def _decode(manifest, run_block, prompt_tokens: int, tokens: int) -> dict[str, Any]:
    """Greedy: the prompt pass, then `tokens` passes of one token; each pass runs every block in
    order through `run_block(i, output names, feeds)`."""
    import numpy as np

    from hermes_ort.streaming.memory import reset_peak_rss
    from hermes_ort.tensors.dataflow import Tensors
    from hermes_ort.tensors.kv_cache import decoder_signature

    sig = decoder_signature(manifest)
    feeds = _prompt(manifest, prompt_tokens)
    chosen, pass_s = [], []
    with _Sampler() as sampler:
        reset_peak_rss()
        for _ in range(tokens + 1):
            t0 = time.perf_counter()
            tensors = Tensors(manifest, feeds)
            for i, spec in enumerate(manifest.blocks):
                tensors.put(i, run_block(i, list(spec.outputs), tensors.inputs_of(i)))
            out = tensors.outputs()
            pass_s.append(time.perf_counter() - t0)
            token = int(np.argmax(out[sig.logits][0, -1]))
            chosen.append(token)
            feeds = _next_feeds(sig, feeds, out, token)
        peak = _status()["VmHWM"]
    return {
        "tokens": chosen,
        "prompt_s": pass_s[0],
        "token_s": pass_s[1:],
        "s_per_token": statistics.median(pass_s[1:]),
        "decode_peak_rss_bytes": peak,
        "decode_high_anon_bytes": sampler.high["RssAnon"],
        "decode_high_file_bytes": sampler.high["RssFile"],
    }


def _settings(threads: int):
    from dataclasses import replace

    from hermes_ort.core.settings import PREPACKED_STREAMING

    return replace(PREPACKED_STREAMING, threads=threads)


def _anon_now() -> int:
    from hermes_ort.streaming.memory import trim_heap

    trim_heap()
    return _status()["RssAnon"]


def _child_resident(model_dir: Path, manifest, args) -> dict[str, Any]:
    from hermes_ort.streaming.sessions import create_session

    settings = _settings(args.threads)
    sessions, anon = [], []
    t0 = time.perf_counter()
    for spec in manifest.blocks:
        before = _anon_now()
        sessions.append(create_session(model_dir / spec.path, settings))
        anon.append(_anon_now() - before)
    create_all_s = time.perf_counter() - t0
    record = _decode(
        manifest, lambda i, n, f: sessions[i].run(n, f), args.prompt_tokens, args.tokens
    )
    return {"create_all_s": create_all_s, "block_anon_bytes": anon, **record}


def _child_streamed(
    model_dir: Path, manifest, args, drop_cache: bool, prepack: bool = True
) -> dict[str, Any]:
    from dataclasses import replace

    from hermes_ort.streaming.loader import drop_own_files
    from hermes_ort.streaming.memory import trim_heap
    from hermes_ort.streaming.sessions import create_session

    settings = replace(_settings(args.threads), prepack=prepack)
    create_s: list[float] = []

    def run_block(i, names, feeds):
        spec = manifest.blocks[i]
        t0 = time.perf_counter()
        session = create_session(model_dir / spec.path, settings)
        create_s.append(time.perf_counter() - t0)
        out = session.run(names, feeds)
        del session
        trim_heap()  # what the daemon does after destroying a session
        if drop_cache:  # ...and, under a budget, with the block's own files' pages
            drop_own_files(spec, model_dir)
        return out

    record = _decode(manifest, run_block, args.prompt_tokens, args.tokens)
    return {"create_per_pass_s": _per_pass(create_s, len(manifest.blocks)), **record}


def _per_pass(samples: list[float], blocks: int) -> float:
    """The median over decode passes (the prompt pass left out) of a per-block time's sum."""
    sums = [sum(samples[k : k + blocks]) for k in range(blocks, len(samples), blocks)]
    return statistics.median(sums) if sums else 0.0


def _child_paged(model_dir: Path, manifest, args, drop_cache: bool) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from hermes_ort.core.choices import VerifyMode
    from hermes_ort.streaming.paged import PagedSession, save_packed
    from hermes_ort.streaming.readahead import warm_files

    saved = [
        save_packed(model_dir / spec.path, args.cache, args.threads) for spec in manifest.blocks
    ]
    warm_files([f for path in saved for f in (path, path.with_suffix(".data"))])
    blocks, anon = [], []
    t0 = time.perf_counter()
    for path in saved:
        before = _anon_now()
        block = PagedSession(path, args.threads, VerifyMode.SIZE)
        block.drop(drop_cache)
        blocks.append(block)
        anon.append(_anon_now() - before)
    create_all_s = time.perf_counter() - t0
    # A loading agent prefetches the next blocks' packed copies (queued as a block starts), the
    # daemon drops each executed block's pages (queued as it ends), each on its own thread, off
    # the inference agent's path; a block's prefetch waits for its own drop still queued.
    dense = [bool(b.copies) for b in blocks]
    n = len(blocks)
    order = [j for j in range(n) if dense[j]]

    def after(i: int) -> list[int]:  # the `--ahead` blocks with copies after i, cyclic
        k = sum(1 for j in order if j <= i)
        return [order[(k + d) % len(order)] for d in range(args.ahead)] if order else []

    ahead = [after(i) for i in range(n)]
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
    daemon = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daemon")
    pending: dict[int, Any] = {}
    dropping: dict[int, Any] = {}
    waits, drops = [], []

    def fetch(i: int) -> None:
        if i in dropping:
            dropping[i].result()
        blocks[i].prefetch()

    def prefetch(i: int) -> None:
        if i < n and dense[i] and i not in pending:
            pending[i] = loader.submit(fetch, i)

    def drop(i: int) -> None:
        t0 = time.perf_counter()
        blocks[i].drop(drop_cache)
        drops.append(time.perf_counter() - t0)

    def run_block(i, names, feeds):
        t0 = time.perf_counter()
        prefetch(i)
        fut = pending.pop(i, None)
        if fut is not None:
            fut.result()
        waits.append(time.perf_counter() - t0)
        for j in ahead[i]:
            prefetch(j)
        out = blocks[i].run(names, feeds)
        dropping[i] = daemon.submit(drop, i)
        return out

    try:
        record = _decode(manifest, run_block, args.prompt_tokens, args.tokens)
    finally:
        loader.shutdown(wait=True)
        daemon.shutdown(wait=True)
    return {
        "create_all_s": create_all_s,
        "block_anon_bytes": anon,
        "block_mapped_bytes": [b.mapped_bytes for b in blocks],
        "block_saved_bytes": [b.data_path.stat().st_size for b in blocks],
        "block_create_s": [b.create_s for b in blocks],
        "ranges_kept_written": sum(len(b.written) for b in blocks),
        "prefetch_wait_per_pass_s": _per_pass(waits, len(blocks)),
        "drop_per_pass_s": _per_pass(drops, len(blocks)),
        "dense_bytes": [b.dense_bytes for b in blocks],
        **record,
    }


def _child_save(model_dir: Path, manifest, args) -> dict[str, Any]:
    """Save every block's packed copy into an empty cache: the one-off cost."""
    from hermes_ort.streaming.paged import save_packed

    t0 = time.perf_counter()
    for spec in manifest.blocks:
        save_packed(model_dir / spec.path, args.cache, args.threads)
    return {"save_all_s": time.perf_counter() - t0}


def child(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser()
    p.add_argument("mechanism", choices=(*MECHANISMS, *EXTRA, "save"))
    p.add_argument("model_dir", type=Path)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ahead", type=int, default=1)
    args = p.parse_args(argv)

    from hermes_ort.core.manifest import load_manifest
    from hermes_ort.streaming.readahead import warm_files

    manifest = load_manifest(args.model_dir)
    if not args.mechanism.startswith("paged"):  # warm: the files it opens (paged: its copies)
        warm_files([args.model_dir / f for f in manifest.block_files()])
    base = _status()
    run = {
        "resident": _child_resident,
        "streamed": lambda d, m, a: _child_streamed(d, m, a, drop_cache=False),
        "streamed-cold": lambda d, m, a: _child_streamed(d, m, a, drop_cache=True),
        "streamed-mapped": lambda d, m, a: _child_streamed(d, m, a, False, prepack=False),
        "paged": lambda d, m, a: _child_paged(d, m, a, drop_cache=False),
        "paged-cold": lambda d, m, a: _child_paged(d, m, a, drop_cache=True),
        "save": _child_save,
    }[args.mechanism]
    record = run(args.model_dir, manifest, args)
    end = _status()
    return {
        "mechanism": args.mechanism,
        "blocks": len(manifest.blocks),
        "base_anon_bytes": base["RssAnon"],
        "base_file_bytes": base["RssFile"],
        "end_anon_bytes": end["RssAnon"],
        "end_file_bytes": end["RssFile"],
        **record,
    }


# -- the parent ----------------------------------------------------------------------------------
def _run(mechanism: str, args, cache: Path) -> dict[str, Any]:
    """One child, in its own memory cgroup where there is one (its peak counts the page cache
    charged to it), of limit `--cap-mb` if given."""
    from hermes_ort.measure.fresh_process import run_child

    cmd = [sys.executable, "-m", "bench.paged_sessions", "--child", mechanism, str(args.model)]
    cmd += ["--cache", str(cache), "--tokens", str(args.tokens), "--threads", str(args.threads)]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--ahead", str(args.ahead)]
    cgroup = None
    emulation = None
    if mechanism != "save" and not args.no_cgroup:
        from bench.device import Emulation

        emulation = Emulation.detect()
    if emulation is not None and emulation.memory_base is not None:
        from bench.device import Launch, run_under

        cap = args.cap_mb << 20 if args.cap_mb else None
        launch = Launch(emulation, cap_bytes=cap, tag="paged")
        result = run_under(launch, cmd, args.timeout, tell_t0=False)
        if launch.memory is not None:
            cgroup = {
                "cap_enforced": launch.cap_enforced,
                "peak_bytes": launch.memory.peak_bytes,
                "failcnt": launch.memory.failcnt,
                "oom_kills": launch.memory.oom_kills,
            }
    else:
        result = run_child(cmd, timeout_s=args.timeout)
    record = {
        "mechanism": mechanism,
        **result.record,
        "ok": result.ok,
        "child_peak_rss_bytes": result.peak_rss_bytes,
        "cgroup": cgroup,
    }
    if not result.ok:
        record["error"] = result.error
    return record


def _mb(x: float | None) -> str:
    return "—" if x is None else f"{x / 2**20:.1f}"


def _cgroup(r: dict[str, Any]) -> str:
    g = r.get("cgroup")
    if not g:
        return "—"
    hit = f", limit hit {g['failcnt']}x" if g["failcnt"] else ""
    return f"{_mb(g['peak_bytes'])}{hit}" + (
        f", {g['oom_kills']} OOM kill" if g["oom_kills"] else ""
    )


def _median(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def render(doc: dict[str, Any]) -> str:
    """One row per mechanism: s/token over every decode token of its runs (the per-run medians
    beside it), the other figures the median of its runs."""
    rows = [
        "| mechanism | s/token (median; per run) | tokens/s | prompt pass s | open all s | "
        "peak RSS MB (child / decode) | decoding: anon / file MB | anon per block MB (mean, "
        "not running) | cgroup peak MB (RSS + page cache) | same tokens as the first |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference = next((r for r in doc["records"] if r.get("ok")), None)
    names = list(dict.fromkeys(r["mechanism"] for r in doc["records"]))
    for name in names:
        runs = [r for r in doc["records"] if r["mechanism"] == name]
        ok = [r for r in runs if r.get("ok")]
        if not ok:
            rows.append(
                f"| {name} | failed: {runs[0].get('error')} | | | | | | | {_cgroup(runs[0])} | |"
            )
            continue
        pooled = statistics.median(t for r in ok for t in r["token_s"])
        per_run = ", ".join(f"{r['s_per_token']:.3f}" for r in ok)
        failed = f"; {len(runs) - len(ok)} failed" if len(ok) < len(runs) else ""
        per_block = (
            statistics.median(statistics.mean(r["block_anon_bytes"]) for r in ok)
            if "block_anon_bytes" in ok[0]
            else None
        )
        if "create_all_s" in ok[0]:
            open_text = f"{_median(ok, 'create_all_s'):.2f}"
        else:
            open_text = f"({_median(ok, 'create_per_pass_s'):.2f} per token)"
        same = "yes" if all(r["tokens"] == reference["tokens"] for r in ok) else "NO"
        mid = sorted(ok, key=lambda r: r["s_per_token"])[len(ok) // 2]
        rows.append(
            f"| {name} | {pooled:.4f} ({per_run}{failed}) | {1 / pooled:.1f} | "
            f"{_median(ok, 'prompt_s'):.3f} | {open_text} | "
            f"{_mb(_median(ok, 'child_peak_rss_bytes'))} / "
            f"{_mb(_median(ok, 'decode_peak_rss_bytes'))} | "
            f"{_mb(_median(ok, 'decode_high_anon_bytes'))} / "
            f"{_mb(_median(ok, 'decode_high_file_bytes'))} | {_mb(per_block)} | {_cgroup(mid)} | "
            f"{same} |"
        )
    saves = [r for r in doc.get("saves", []) if r.get("ok")]
    paged = next((r for r in doc["records"] if r["mechanism"] == "paged" and r.get("ok")), None)
    notes = [
        "",
        f"Model: `{doc['model']}` ({doc['blocks']} blocks), {doc['threads']} threads, "
        f"{doc['tokens']} decode tokens after a {doc['prompt_tokens']}-token prompt, "
        f"{doc['repeat']} run(s) per mechanism in turn, paged blocks prefetched "
        f"{doc.get('ahead', 1)} ahead; {doc['machine']}; ONNX Runtime {doc['onnxruntime']}. "
        "Rough: measured beside other work on the same cores."
        + (
            f" Each child in a memory cgroup capped at {_mb(doc['cap_bytes'])} MB."
            if doc.get("cap_bytes")
            else ""
        ),
    ]
    if saves:
        notes.append(
            "Saving every block's packed copy once (empty cache): "
            f"{statistics.median(r['save_all_s'] for r in saves):.2f} s."
        )
    if paged:
        notes.append(
            f"Paged: saved files {_mb(sum(paged['block_saved_bytes']))} MB (the blocks' own: "
            f"{_mb(doc.get('model_block_bytes'))} MB), mapped "
            f"{_mb(sum(paged['block_mapped_bytes']))} MB, of which packed copies (prefetched) "
            f"{_mb(sum(paged['dense_bytes']))} MB; anonymous bytes kept by all open "
            f"sessions {_mb(sum(paged['block_anon_bytes']))} MB; process baseline "
            f"{_mb(paged['base_anon_bytes'])} MB anon / {_mb(paged['base_file_bytes'])} MB file."
        )
    for name in names:
        ok = [r for r in doc["records"] if r["mechanism"] == name and r.get("ok")]
        if ok and "drop_per_pass_s" in ok[0]:
            notes.append(
                f"{name}: per token, waiting for prefetch "
                f"{_median(ok, 'prefetch_wait_per_pass_s') * 1e3:.1f} ms, dropping (on the "
                f"daemon) {_median(ok, 'drop_per_pass_s') * 1e3:.1f} ms; ranges left alone "
                f"(written by ORT): {max(r['ranges_kept_written'] for r in ok)}."
            )
    return "\n".join(rows + notes) + "\n"


def _evict(model_dir: Path, cache: Path) -> None:
    """The model's and the saved copies' pages out of the page cache: a child's own reads are
    then charged to its cgroup (the page cache is charged to the group that first reads it)."""
    from hermes_ort.core.manifest import load_manifest
    from hermes_ort.streaming.memory import drop_file_cache

    for f in load_manifest(model_dir).block_files():
        drop_file_cache(str(model_dir / f))
    for path in cache.rglob("*"):
        if path.is_file():
            drop_file_cache(str(path))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--mechanisms", default=",".join(MECHANISMS))
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=1, help="runs per mechanism, taken in turn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ahead", type=int, default=1, help="paged: blocks prefetched ahead")
    p.add_argument("--cache", type=Path, help="packed copies' cache (default: a fresh temp dir)")
    p.add_argument("--cap-mb", type=int, help="the children's memory cgroup limit, in MiB")
    p.add_argument("--no-cgroup", action="store_true", help="children in no memory cgroup")
    p.add_argument("--timeout", type=float, default=170)
    p.add_argument("--out", type=Path, default=Path("bench/results/latest/paged"))
    p.add_argument("--name", default="paged", help="file name of the JSON and Markdown")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        from hermes_ort.measure.fresh_process import child_main

        return child_main(child, argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args) -> int:
    """`python -m bench paged` (bench/cli.py) and `python -m bench.paged_sessions`."""
    import platform

    import onnxruntime

    from hermes_ort.core.machine import cpu_name
    from hermes_ort.core.manifest import load_manifest

    if not (args.model / "manifest.json").is_file():
        print(
            f"no model at {args.model}: export SmolLM2-135M-Instruct's GGUF first, e.g.\n"
            f"  hermes-ort export --model $(python -c 'from hermes_ort.cli.fetch import "
            f"packaged_file, SMOLLM2_GGUF; print(packaged_file(SMOLLM2_GGUF))') --out {args.model}",
            file=sys.stderr,
        )
        return 2
    cache = args.cache or Path(tempfile.mkdtemp(prefix="hermes-packed-"))
    doc: dict[str, Any] = {
        "kind": "hermes-ort-paged-bench",
        "schema_version": 1,
        "model": str(args.model),
        "model_block_bytes": load_manifest(args.model).blocks_bytes,
        "machine": f"{platform.machine()} {cpu_name()}, {os.cpu_count()} cores",
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "ahead": args.ahead,
        "tokens": args.tokens,
        "prompt_tokens": args.prompt_tokens,
        "repeat": args.repeat,
        "cap_bytes": args.cap_mb << 20 if args.cap_mb else None,
        "started_at": time.time(),
        "saves": [],
        "records": [],
    }
    try:
        mechanisms = args.mechanisms.split(",")
        if any(m.startswith("paged") for m in mechanisms):
            doc["saves"].append(_run("save", args, cache))
        for run in range(args.repeat):
            for mechanism in mechanisms:
                _evict(args.model, cache)
                record = {**_run(mechanism, args, cache), "run": run}
                doc["records"].append(record)
                done = f"{record['s_per_token']:.4f} s/token" if record.get("ok") else "failed"
                print(f"{mechanism}: {done} {record.get('error') or ''}", flush=True)
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)
    doc["blocks"] = next((r["blocks"] for r in doc["records"] if r.get("ok")), 0)
    table = render(doc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
