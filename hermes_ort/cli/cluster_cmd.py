"""`hermes-ort run|generate|plan MODEL_DIR --cluster ADDRESS`: the same commands with the model's
blocks split over the boards of a Ray cluster (cluster.py). `--budget` is then per board: one
size for every board, or `NAME=SIZE,NAME=SIZE` (a board left out gets what it reports free)."""

from __future__ import annotations

import json
import sys

from hermes_ort.core.errors import OptionError
from hermes_ort.core.units import format_bytes

ONE_BOARD_ONLY = ("strategy", "loaders", "window", "load_path", "trace")


def add_cluster_options(p) -> None:
    p.add_argument(
        "--cluster",
        default=None,
        metavar="ADDRESS",
        help="split the model over a Ray cluster's boards: 'auto' or HEAD:PORT (extra 'cluster')",
    )
    p.add_argument(
        "--boards",
        default=None,
        metavar="LIST",
        help="with --cluster: the boards (Ray node names) to use, comma-separated "
        "(default: every alive node but the head)",
    )


def board_budgets(text: str | None):
    """`--budget` with --cluster: None, one size, or NAME=SIZE pairs."""
    if text is None or "=" not in text:
        return text
    budgets = {}
    for part in text.split(","):
        name, sep, size = part.partition("=")
        if not sep or not name.strip() or not size.strip():
            raise OptionError(f"--budget '{text}': give SIZE or NAME=SIZE,NAME=SIZE")
        budgets[name.strip()] = size.strip()
    return budgets


def boards_of(args) -> list[str] | None:
    return None if args.boards is None else [b.strip() for b in args.boards.split(",") if b]


def check_one_board_options(args) -> None:
    defaults = {"strategy": "pipeload", "load_path": "default"}
    used = [
        f"--{o.replace('_', '-')}"
        for o in ONE_BOARD_ONLY
        if getattr(args, o, None) not in (None, defaults.get(o))
    ]
    if used:
        raise OptionError(f"{', '.join(used)}: one board's option(s), not with --cluster")


def cmd_plan_cluster(args) -> int:
    from hermes_ort.cluster.driver import plan_on_cluster

    check_one_board_options(args)
    plan = plan_on_cluster(
        args.model_dir, args.cluster, board_budgets(args.budget), boards_of(args)
    )
    if getattr(args, "json", False):
        print(json.dumps(plan.to_json()))
    else:
        print(plan.describe())
    return 0


def cmd_run_cluster(args, feeds) -> int:
    import hermes_ort

    check_one_board_options(args)
    model = hermes_ort.load(
        args.model_dir,
        memory_budget=board_budgets(args.budget),
        cluster=args.cluster,
        boards=boards_of(args),
        verify=args.verify,
    )
    with model:
        if feeds is None:
            feeds = model.sample_inputs(batch_size=args.batch or 1, sequence_length=args.seq_len)
        passes = []
        for _ in range(args.repeat):
            outputs = model.run(feeds)
            passes.append(model.stats["latency_s"])
        stages = model.stage_stats()
    if args.json:
        print(
            json.dumps(
                {
                    "model_dir": str(args.model_dir),
                    "cluster": args.cluster,
                    "split": model.plan.to_json(),
                    "passes_s": passes,
                    "stages": stages,
                }
            )
        )
        return 0
    print(model.plan.describe())
    for name, value in outputs.items():
        flat = value.reshape(-1)
        print(f"output {name}: shape {tuple(value.shape)} {value.dtype}, mean {flat.mean():.6g}")
    for k, t in enumerate(passes):
        print(f"pass {k + 1}: latency {t * 1000:.1f} ms over {len(stages)} stage(s)")
    for s, st in zip(model.plan.stages, stages, strict=True):
        print(
            f"stage {s.index} on '{s.board.name}': last pass {st['latency_s'] * 1000:.1f} ms, "
            f"peak RSS {format_bytes(st['peak_rss_bytes'])}, read {format_bytes(st['bytes_read'])}"
        )
    return 0


def cmd_generate_cluster(args, ids, tokenizer) -> int:
    import hermes_ort

    check_one_board_options(args)
    with hermes_ort.load(
        args.model_dir,
        memory_budget=board_budgets(args.budget),
        cluster=args.cluster,
        boards=boards_of(args),
    ) as model:
        out = model.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=args.eos,
            seed=args.seed,
        )
        s = model.generation_stats
        split = model.plan
    new = [int(t) for t in out[len(ids) :]]
    text = tokenizer.decode(new) if tokenizer else None
    if args.json:
        print(json.dumps({"prompt_ids": ids, "new_ids": new, "text": text, **s.__dict__}))
        return 0
    print((args.prompt or "") + (text if text is not None else " ".join(map(str, new))))
    print(
        f"\n{s.new_tokens} tokens ({s.stopped_by}) | first token "
        f"{s.time_to_first_token_s * 1000:.0f} ms | {s.decode_tokens_per_s:.2f} tokens/s after "
        f"it | {len(split.stages)} stage(s): "
        + ", ".join(f"'{st.board.name}' {st.blocks} blocks" for st in split.stages),
        file=sys.stderr,
    )
    return 0
