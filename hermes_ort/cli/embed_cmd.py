"""`hermes-ort embed MODEL_DIR --text "..."`: sentence embeddings with an encoder, pooled as its
checkpoint declares (sentence-transformers' modules.json). Prints each text's embedding in short
and, for a few texts, their cosine similarities; --json prints every value, --save writes an
.npy. Time and peak memory on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from hermes_ort.core.errors import InputError, OptionError
from hermes_ort.core.units import format_bytes

SIMILARITY_UP_TO = 10  # texts; more make a table nobody reads


def add_embed(sub) -> None:
    from hermes_ort.core.choices import StrategyName, values

    p = sub.add_parser("embed", help="sentence embeddings with an encoder (feature-extraction)")
    p.add_argument(
        "model_dir", type=Path, help="an encoder's model directory written by `hermes-ort export`"
    )
    p.add_argument("--text", action="append", default=[], help="a text to embed (repeatable)")
    p.add_argument(
        "--file", type=Path, default=None, help="texts to embed, one per line ('-': stdin)"
    )
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalise the embeddings, or not (default: as the checkpoint declares)",
    )
    p.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="texts per pass (default 32)"
    )
    p.add_argument("--budget", default=None, help="memory budget, e.g. 200MB, 'min'")
    p.add_argument(
        "--strategy",
        default="pipeload",
        choices=values(StrategyName),
        help="pipeload (default) plans within --budget; the baselines have fixed plans",
    )
    p.add_argument("--save", type=Path, default=None, metavar="FILE", help="write them to .npy")
    p.add_argument("--json", action="store_true", help="print one JSON record with every value")
    p.set_defaults(func=cmd_embed)


def _texts(args) -> list[str]:
    texts = list(args.text)
    if args.file is not None:
        try:
            lines = (
                sys.stdin.read() if str(args.file) == "-" else args.file.read_text("utf-8")
            ).splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read --file '{args.file}': {e}") from None
        texts += [line for line in lines if line.strip()]  # blank lines are no texts
    if not texts:
        raise OptionError("give the texts to embed: --text TEXT (repeatable) or --file FILE")
    return texts


def cmd_embed(args) -> int:
    import hermes_ort
    from hermes_ort.cli.model_options import load_model
    from hermes_ort.runtime.embedding import PoolingNotDeclared, check_encoder
    from hermes_ort.tensors.pooling import read_pooling

    check_encoder(args.model_dir, hermes_ort.load_manifest(args.model_dir))
    texts = _texts(args)
    if args.batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {args.batch_size}")
    pooling = read_pooling(args.model_dir)
    if args.normalize is not None:
        pooling = replace(pooling, normalize=args.normalize)
    with load_model(args.model_dir, memory_budget=args.budget, strategy=args.strategy) as model:
        t0, peak, parts = time.perf_counter(), 0, []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PoolingNotDeclared)  # said once, below
            for start in range(0, len(texts), args.batch_size):  # one pass each
                chunk = texts[start : start + args.batch_size]
                parts.append(model.embed(chunk, normalize=args.normalize, batch_size=len(chunk)))
                peak = max(peak, model.stats.peak_rss_bytes)
        took = time.perf_counter() - t0
        plan = model.plan
    vectors = np.concatenate(parts)
    if pooling.declared_by is None:
        print(
            f"hermes-ort: note: '{args.model_dir}' declares no pooling (no sentence-transformers "
            f"modules.json): mean pooling over the attention mask",
            file=sys.stderr,
        )
    if args.save is not None:
        try:
            np.save(args.save, vectors)
        except OSError as e:
            raise InputError(f"cannot write --save '{args.save}': {e}") from None
    if args.json:
        record = {
            "model_dir": str(args.model_dir),
            "pooling": [m.value for m in pooling.modes],
            "pooling_declared_by": pooling.declared_by,
            "normalized": pooling.normalize,
            "dimensions": int(vectors.shape[1]),
            "texts": texts,
            "embeddings": vectors.tolist(),
            "total_s": took,
            "peak_rss_bytes": peak,
        }
        print(json.dumps(record))
        return 0
    _print(texts, vectors, pooling.describe())
    print(
        f"{len(texts)} texts in {took:.2f} s ({len(texts) / took:.1f} texts/s) | peak RSS "
        f"{format_bytes(peak)} | {plan.strategy}"
        + (f" under {format_bytes(plan.budget_bytes)}" if plan.budget_bytes else ""),
        file=sys.stderr,
    )
    return 0


def _print(texts: list[str], vectors: np.ndarray, how: str) -> None:
    print(f"{len(texts)} embeddings of {vectors.shape[1]} dimensions: {how}")
    for i, (text, v) in enumerate(zip(texts, vectors, strict=True)):
        head = " ".join(f"{x:+.4f}" for x in v[:4])
        short = json.dumps(text if len(text) <= 60 else text[:57] + "...", ensure_ascii=False)
        print(f"[{i}] {head} ... norm {np.linalg.norm(v):.4f}  {short}")
    if 1 < len(texts) <= SIMILARITY_UP_TO:
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        sims = unit @ unit.T
        print("cosine similarity:")
        print("     " + "".join(f"{f'[{j}]':>8}" for j in range(len(texts))))
        for i, row in enumerate(sims):
            print(f"{f'[{i}]':>4} " + "".join(f"{x:8.4f}" for x in row))
