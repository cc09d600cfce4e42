"""Quality of quantized exports against their fp32 export, on real text the exporter never saw
(bench/data/eval.txt):

    python -m bench quality --reference models/smol-fp32 models/smol-int4 models/smol-int8 \\
        --out bench/results/latest/quality

Decoders: perplexity of the text in 128-token windows (each starts with the model's BOS token and
an empty KV cache; one pass reads every position's logits), top-1 agreement with the reference's
next-token predictions, and decode tokens/s (64 new tokens after a warm-up run; median of 3
rounds, each over every directory in turn).
Encoders: the cosine of each sentence's embedding (the directory's declared pooling) with the
reference's. Bytes: the blocks' files, each once. Speed is a figure only on an otherwise idle
machine (`--no-speed` skips it). JSON (one record per model directory, raw samples kept) and a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import REPO

TEXT = REPO / "bench" / "data" / "eval.txt"
WINDOW = 128
NEW_TOKENS = 64
PROMPT_TOKENS = 32
SENTENCES = 48  # encoder: the text's first sentences


# -- decoders ------------------------------------------------------------------------------------
def windows(ids: list[int], bos: int | None, size: int) -> list[np.ndarray]:
    """The text's ids cut into windows of `size`, each led by BOS (a window shorter than a
    quarter of `size` at the end is dropped)."""
    step = size - (bos is not None)
    out = []
    for start in range(0, len(ids), step):
        part = ids[start : start + step]
        if len(part) < size // 4:
            break
        out.append(np.array(([bos] if bos is not None else []) + part, np.int64))
    return out


def window_feeds(model, ids: np.ndarray) -> dict[str, np.ndarray]:
    """One window as a prompt pass: every input at its sample shape, past length 0."""
    feeds = model.sample_inputs(batch_size=1, sequence_length=len(ids))
    feeds["input_ids"] = ids[None, :]
    if "attention_mask" in feeds:
        feeds["attention_mask"] = np.ones((1, len(ids)), feeds["attention_mask"].dtype)
    if "position_ids" in feeds:
        feeds["position_ids"] = np.arange(len(ids), dtype=feeds["position_ids"].dtype)[None, :]
    return feeds


def score(model, parts: list[np.ndarray]) -> tuple[list[float], list[int], list[np.ndarray]]:
    """Per window: the summed negative log-likelihood of its tokens after the first, their
    count, and the predicted next tokens (argmax) at every position."""
    nll, counts, predicted = [], [], []
    for ids in parts:
        logits = model.run(window_feeds(model, ids))["logits"][0].astype(np.float64)  # [T, V]
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        targets = ids[1:]
        nll.append(float(-log_probs[np.arange(len(targets)), targets].sum()))
        counts.append(len(targets))
        predicted.append(logits.argmax(-1))
    return nll, counts, predicted


def decode_speed(model_dir: Path, prompt: list[int], new_tokens: int) -> float:
    """Decode tokens/s of one greedy run after a warm-up run, the model loaded afresh."""
    import hermes_ort

    with hermes_ort.load(model_dir) as model:
        model.generate(prompt, new_tokens, eos_token_id=[])
        model.generate(prompt, new_tokens, eos_token_id=[])
        return model.generation_stats.decode_tokens_per_s


def speed_rounds(records: list[dict[str, Any]], args) -> None:
    """Each decoder's tokens/s, `repeats` rounds over all of them in turn (a load elsewhere on
    the machine then weighs on every configuration alike); the median into each record."""
    decoders = [r for r in records if r["kind"] == "decoder"]
    for r in decoders:
        r["decode_samples"] = []
    for _ in range(args.repeats):
        for r in decoders:
            rate = decode_speed(Path(r["model_dir"]), r["_prompt"], args.new_tokens)
            r["decode_samples"].append(rate)
    for r in decoders:
        r["decode_tokens_per_s"] = statistics.median(r["decode_samples"])


def bos_id(model_dir: Path) -> int | None:
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("bos_token_id")
            if isinstance(value, int):
                return value
    return None


# -- encoders ------------------------------------------------------------------------------------
def sentences(text: str, count: int) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if len(p.split()) >= 3][:count]


def embed(model, model_dir: Path, texts: list[str]) -> np.ndarray:
    """Each sentence's embedding [S, H], one sentence a pass (no padding)."""
    from hermes_ort.generation.tokenizer import load_tokenizer
    from hermes_ort.tensors.pooling import pool, read_pooling

    tokenizer, pooling = load_tokenizer(model_dir), read_pooling(model_dir)
    names = {t.name for t in model.manifest.inputs}
    out = []
    for text in texts:
        batch = tokenizer.encode_batch([text], max_length=WINDOW * 4, pad_id=0)
        feeds = {k: v for k, v in batch.items() if k in names}
        hidden = model.run(feeds)[model.manifest.output_names[0]]
        out.append(pool(hidden, batch["attention_mask"], pooling)[0])
    return np.stack(out)


def cosines(a: np.ndarray, b: np.ndarray) -> list[float]:
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return [float(x) for x in num / den]


# -- one directory -------------------------------------------------------------------------------
def block_bytes(model_dir: Path) -> tuple[int, int]:
    """(file length, bytes on disk) of the blocks' files, each once: the data files' 64 KiB
    alignment leaves holes that the length counts and the disk does not hold."""
    import os

    from hermes_ort.core.manifest import load_manifest

    files = load_manifest(model_dir).block_files()
    length = sum(f.bytes for f in files.values())
    return length, sum(os.stat(model_dir / p).st_blocks * 512 for p in files)


def measure(model_dir: Path, reference: dict | None, args) -> dict[str, Any]:
    import hermes_ort

    manifest = hermes_ort.load_manifest(model_dir)
    record: dict[str, Any] = {
        "model_dir": str(model_dir),
        "label": model_dir.name,
        "quantization": manifest.quantization,
    }
    record["blocks_file_bytes"], record["blocks_bytes"] = block_bytes(model_dir)
    text = args.text.read_text()
    with hermes_ort.load(model_dir) as model:
        if "logits" in manifest.output_names:
            from hermes_ort.generation.tokenizer import load_tokenizer

            ids = load_tokenizer(model_dir).encode(text, add_special_tokens=False)
            parts = windows(ids, bos_id(model_dir), args.window)
            nll, counts, predicted = score(model, parts)
            record.update(
                kind="decoder",
                windows=len(parts),
                tokens=sum(counts),
                window_nll=nll,
                window_tokens=counts,
                perplexity=float(np.exp(sum(nll) / sum(counts))),
            )
            if reference is not None:
                same = [
                    float((p[:-1] == r[:-1]).mean())
                    for p, r in zip(predicted, reference["_predicted"], strict=True)
                ]
                weights = np.array(counts, float)
                record["window_top1"] = same
                record["top1"] = float(np.average(same, weights=weights))
                record["perplexity_ratio"] = record["perplexity"] / reference["perplexity"]
            record["_predicted"] = predicted
            record["_prompt"] = ids[: args.prompt_tokens]
        else:
            vectors = embed(model, model_dir, sentences(text, SENTENCES))
            record.update(kind="encoder", sentences=len(vectors), _vectors=vectors)
            if reference is not None:
                cos = cosines(vectors, reference["_vectors"])
                record.update(sentence_cosine=cos, cosine_min=min(cos), cosine_mean=np.mean(cos))
    return record


# -- the table -----------------------------------------------------------------------------------
def _method(q: dict | None) -> str:
    if not q:
        return "fp32"
    if q.get("method") == "dynamic":
        return f"{q['mode']} dynamic"
    if q["mode"] == "gguf":  # the file's own blocks, per GGML type
        return "GGUF as is: " + ", ".join(f"{k} {v}" for k, v in q.get("types", {}).items())
    head = f", head/tables {q.get('head_bits', 8)}-bit" if q["mode"] == "int4" else ""
    return f"{q['mode']} {q.get('algorithm')} block {q.get('block_size')}{head}"


def render(doc: dict[str, Any]) -> str:
    from hermes_ort.core.units import format_bytes

    ref = doc["records"][0]
    rows = doc["records"]
    speed = "not isolated" if not doc.get("isolated") else "isolated"
    out = [
        f"# Quality on real text: {ref['label']} and its quantized exports",
        "",
        f"Text: `{doc['text']}` ({doc['text_tokens']} tokens in the reference's tokenizer); "
        f"reference: `{ref['model_dir']}`. Machine: {doc['machine'].get('cpu', '?')}, "
        f"{doc['machine'].get('cores', '?')} cores; tokens/s {speed} (median of "
        f"{doc['repeats']}, {doc['new_tokens']} new tokens after a {doc['prompt_tokens']}-token "
        "prompt).",
        "",
    ]
    if ref["kind"] == "decoder":
        out += [
            "| export | blocks on disk | vs fp32 | perplexity | vs fp32 | top-1 = fp32 "
            "| tokens/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            tps = r.get("decode_tokens_per_s")
            out.append(
                f"| {r['label']} ({_method(r['quantization'])}) | "
                f"{format_bytes(r['blocks_bytes'])} | "
                f"{r['blocks_bytes'] / ref['blocks_bytes']:.3f}x | {r['perplexity']:.2f} | "
                f"{r.get('perplexity_ratio', 1.0):.3f}x | {r.get('top1', 1.0):.1%} | "
                f"{'-' if tps is None else f'{tps:.1f}'} |"
            )
    else:
        out += [
            "| export | blocks on disk | vs fp32 | cosine to fp32 (min) | (mean) |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            out.append(
                f"| {r['label']} ({_method(r['quantization'])}) | "
                f"{format_bytes(r['blocks_bytes'])} | "
                f"{r['blocks_bytes'] / ref['blocks_bytes']:.3f}x | "
                f"{r.get('cosine_min', 1.0):.5f} | {r.get('cosine_mean', 1.0):.5f} |"
            )
    return "\n".join(out) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", type=Path, help="quantized exports of the reference")
    p.add_argument("--reference", type=Path, help="the fp32 export they are compared with")
    p.add_argument(
        "--text", type=Path, default=TEXT, help="real text (default bench/data/eval.txt)"
    )
    p.add_argument("--window", type=int, default=WINDOW, help="tokens per window (default 128)")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    p.add_argument("--repeats", type=int, default=3, help="rounds of timed decoding (default 3)")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="quality only")
    p.add_argument(
        "--isolated",
        action="store_true",
        help="state that nothing else ran on the machine (the table marks speed otherwise)",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results/latest/quality"))
    p.add_argument("--name", default="quality", help="file stem of the JSON and Markdown")
    p.add_argument("--render", type=Path, metavar="JSON", help="render a quality JSON again")


def run(args) -> int:
    from bench.records import machine_info, to_json, versions

    if args.render:
        doc = json.loads(args.render.read_text())
        table = render(doc)
        args.render.with_suffix(".md").write_text(table)
        print(table)
        return 0
    if args.reference is None:
        raise ValueError("give --reference: the fp32 export the others are compared with")
    reference = measure(args.reference, None, args)
    records = [reference]
    for model_dir in args.models:
        t = time.perf_counter()
        records.append(measure(model_dir, reference, args))
        records[-1]["measure_s"] = time.perf_counter() - t
        print(render_line(records[-1]), flush=True)
    if args.speed:
        speed_rounds(records, args)

    doc = {
        "kind": "hermes-ort quality bench",
        "schema_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "text": str(args.text.relative_to(REPO) if args.text.is_relative_to(REPO) else args.text),
        "text_tokens": text_tokens(args.reference, args.text.read_text()),
        "window": args.window,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats,
        "isolated": args.isolated,
        "machine": machine_info(),
        "versions": versions(),
        "records": [{k: v for k, v in r.items() if not k.startswith("_")} for r in records],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(to_json(doc), indent=1))
    table = render(doc)
    (args.out / f"{args.name}.md").write_text(table)
    print(table)
    return 0


def text_tokens(model_dir: Path, text: str) -> int:
    """The text's length in the model's tokens (whatever truncation its tokenizer.json keeps)."""
    from hermes_ort.generation.tokenizer import load_tokenizer

    backend = load_tokenizer(model_dir).backend
    whole = type(backend).from_str(backend.to_str())
    whole.no_truncation()
    return len(whole.encode(text, add_special_tokens=False).ids)


def render_line(r: dict[str, Any]) -> str:
    if r["kind"] == "decoder":
        return (
            f"{r['label']}: perplexity {r['perplexity']:.2f} ({r['perplexity_ratio']:.3f}x), "
            f"top-1 {r['top1']:.1%}, {r['blocks_bytes'] / 1e6:.1f} MB"
        )
    return f"{r['label']}: cosine min {r['cosine_min']:.5f} mean {r['cosine_mean']:.5f}"
