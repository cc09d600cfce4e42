"""`hermes-ort chat MODEL_DIR`: talk with an instruct model through its chat template. Each line
read from stdin is a user message (until end of input or `/exit`); `--prompt` answers one message
and exits. The reply streams to stdout as it is generated; tokens/s and peak memory follow on
stderr after each turn, as `hermes-ort generate` prints them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from hermes_ort.core.errors import OptionError

EXIT = "/exit"


def add_chat(sub) -> None:
    from hermes_ort.cli.model_options import add_budget_and_strategy

    p = sub.add_parser("chat", help="chat with an instruct model (its chat template)")
    p.add_argument(
        "model_dir",
        type=Path,
        help="an instruct decoder's model directory (with its tokenizer and chat template)",
    )
    p.add_argument(
        "--prompt",
        default=None,
        help="answer this one message and exit (default: a message per line of stdin, until "
        f"end of input or {EXIT})",
    )
    p.add_argument("--system", default=None, help="a system prompt before the conversation")
    p.add_argument(
        "--max-new-tokens", type=int, default=256, metavar="N", help="reply length limit (256)"
    )
    add_budget_and_strategy(p)
    p.add_argument(
        "--profile", action="store_true", help="measure a layer profile first if none is stored"
    )
    p.add_argument(
        "--sample",
        action="store_true",
        help="sample instead of greedy decoding (implied by --temperature, --top-k, --top-p)",
    )
    p.add_argument("--temperature", type=float, default=None, help="sample, logits divided by it")
    p.add_argument("--top-k", type=int, default=None, help="sample from the K likeliest tokens")
    p.add_argument(
        "--top-p", type=float, default=None, help="sample from the likeliest tokens up to P"
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    p.set_defaults(func=cmd_chat)


def _messages(args) -> Iterator[str]:
    """The user's messages: --prompt, else stdin's non-empty lines until EOF or /exit (a `> `
    prompt on stderr when a person types them)."""
    if args.prompt is not None:
        yield args.prompt
        return
    typed = sys.stdin.isatty()
    while True:
        if typed:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == EXIT:
            return
        if line.strip():
            yield line.rstrip("\n")


def cmd_chat(args) -> int:
    import hermes_ort
    from hermes_ort.cli.generate_cmd import stats_line
    from hermes_ort.cli.model_options import load_for_generation
    from hermes_ort.generation.chat import require_decoder
    from hermes_ort.generation.chat_template import load_chat_template
    from hermes_ort.tensors.kv_cache import decoder_signature

    manifest = hermes_ort.load_manifest(args.model_dir)  # a missing model is named as such
    require_decoder(args.model_dir, decoder_signature(manifest))
    load_chat_template(args.model_dir)  # none: said before the model loads
    if args.max_new_tokens < 1:
        raise OptionError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    sampled = args.sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with load_for_generation(args) as model:
        if args.prompt is None and sys.stdin.isatty():
            print(f"chat with '{args.model_dir}' ({EXIT} or Ctrl-D ends it)", file=sys.stderr)
        history: list[dict[str, str]] = []
        for text in _messages(args):
            history.append({"role": "user", "content": text})
            reply = model.chat(
                history,
                max_new_tokens=args.max_new_tokens,
                system=args.system,
                do_sample=sampled,
                temperature=1.0 if args.temperature is None else args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                streamer=show,
            )
            history.append({"role": "assistant", "content": reply})
            show("\n")
            print(stats_line(model.generation_stats, model.plan), file=sys.stderr)
    return 0
