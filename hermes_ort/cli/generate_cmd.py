"""`hermes-ort generate MODEL_DIR --prompt "..."`: stream text to the terminal, then tokens/s, time
to first token and peak memory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hermes_ort.cli.cluster_cmd import add_cluster_options, cmd_generate_cluster
from hermes_ort.core.errors import InputError, OptionError
from hermes_ort.core.units import format_bytes


def add_generate(sub) -> None:
    from hermes_ort.cli.model_options import add_budget_and_strategy

    p = sub.add_parser("generate", help="generate text with a decoder exported with its KV cache")
    p.add_argument(
        "model_dir", type=Path, help="a decoder's model directory written by `hermes-ort export`"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (needs the model's tokenizer)")
    source.add_argument("--ids", help="prompt token ids, comma-separated (no tokenizer needed)")
    p.add_argument(
        "--max-new-tokens", type=int, default=32, metavar="N", help="tokens to add (default 32)"
    )
    add_budget_and_strategy(p)
    p.add_argument(
        "--profile", action="store_true", help="measure a layer profile first if none is stored"
    )
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument(
        "--temperature", type=float, default=1.0, help="with --sample: logits divided by it"
    )
    p.add_argument(
        "--top-k", type=int, default=None, help="with --sample: only the K likeliest tokens"
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="with --sample: only the likeliest tokens whose probabilities add up to P",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    p.add_argument(
        "--eos",
        type=int,
        action="append",
        default=None,
        metavar="ID",
        help="stop token id (repeatable; default: the model's generation_config.json)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    add_cluster_options(p)
    p.set_defaults(func=cmd_generate)


def _prompt(args, model_dir: Path):
    """(token ids, tokenizer or None)."""
    if args.ids is not None:
        try:
            return [int(x) for x in args.ids.split(",") if x.strip()], None
        except ValueError:
            raise InputError(f"--ids must be comma-separated integers, got '{args.ids}'") from None
    from hermes_ort.generation.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    return tokenizer.encode(args.prompt), tokenizer


class _TextStream:
    """Prints the text of the new tokens as they come. Decodes all new ids each time and prints
    what was added, so a character split over several tokens appears once it is whole."""

    def __init__(self, tokenizer, out) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        if self.tokenizer is None:
            self.out.write(f"{token}" if len(self.ids) == 1 else f" {token}")
        else:
            text = self.tokenizer.decode(self.ids)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
                return
            self.out.write(text[len(self.shown) :])
            self.shown = text
        self.out.flush()


def cmd_generate(args) -> int:
    import hermes_ort
    from hermes_ort.cli.model_options import load_for_generation

    hermes_ort.load_manifest(args.model_dir)  # a missing model is named as such, first
    ids, tokenizer = _prompt(args, args.model_dir)
    if args.max_new_tokens < 1:
        raise OptionError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.cluster is not None:
        return cmd_generate_cluster(args, ids, tokenizer)
    with load_for_generation(args) as model:
        stream = None
        if not args.json:
            if args.prompt is not None:
                sys.stdout.write(args.prompt)
            stream = _TextStream(tokenizer, sys.stdout)
        out = model.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=args.eos,
            seed=args.seed,
            streamer=stream,
        )
        s = model.generation_stats
        plan = model.plan
        if stream is not None:
            sys.stdout.write("\n")  # the text's line ends: output ends with a newline
            sys.stdout.flush()
    new = [int(t) for t in out[len(ids) :]]
    if args.json:
        record = {
            "model_dir": str(args.model_dir),
            "strategy": plan.strategy,
            "budget_bytes": plan.budget_bytes,
            "prompt_ids": ids,
            "new_ids": new,
            "text": tokenizer.decode(new) if tokenizer else None,
            **s.__dict__,
        }
        print(json.dumps(record))
        return 0
    print(f"\n{stats_line(s, plan)}", file=sys.stderr)
    return 0


def stats_line(s, plan) -> str:
    """One generation's figures (a GenerationStats under a Plan), for stderr."""
    return (
        f"{s.new_tokens} tokens ({s.stopped_by}) | prompt {s.prompt_tokens} tokens, "
        f"first token {s.time_to_first_token_s * 1000:.0f} ms | "
        f"{s.decode_tokens_per_s:.2f} tokens/s after it | "
        f"peak RSS {format_bytes(s.peak_rss_bytes)} | read {format_bytes(s.bytes_read)} | "
        f"KV cache {format_bytes(s.cache_bytes)} | {plan.strategy}"
        + (f" under {format_bytes(plan.budget_bytes)}" if plan.budget_bytes else "")
    )
