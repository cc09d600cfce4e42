"""`hermes-ort info MODEL_DIR`: what an exported model is, its inputs and outputs (repeated
names grouped: `past_key_values.{0..29}.key/value`), and each block's two sizes, named: its
files, and what it holds in memory once it has run (the size a budget error names)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from hermes_ort.cli.model_options import MODEL_DIR_HELP
from hermes_ort.core.units import format_bytes


def add_info(sub) -> None:
    p = sub.add_parser("info", help="describe an exported model directory")
    p.add_argument("model_dir", type=Path, help=MODEL_DIR_HELP)
    p.add_argument("--verify", action="store_true", help="also hash every file now (sha256)")
    p.set_defaults(func=cmd_info)


_INT_RUN = re.compile(r"\d+")


def group_tensors(tensors) -> list[tuple[str, str]]:
    """(name, type) lines of a manifest's inputs or outputs, in their order. Tensors whose names
    differ only in one run of digits, of equal dtype and shape, are one line
    (`present.{0..29}.key`); such lines that differ only in one dotted word are merged
    (`present.{0..29}.key/value`): a decoder's 60+ cache tensors in two lines."""

    def type_of(t) -> str:
        return f"{t.dtype}[{', '.join(str(d) for d in t.shape)}]"

    # every way a name can vary: (name with one digit run as {}, type) -> how many names fit it
    candidates = [
        [
            (t.name[: r.start()] + "{}" + t.name[r.end() :], type_of(t), r.group())
            for r in _INT_RUN.finditer(t.name)
        ]
        for t in tensors
    ]
    fits = Counter((pattern, kind) for c in candidates for pattern, kind, _ in c)
    groups: dict[tuple[str, str], list[str]] = {}
    order: list[tuple[str, str] | str] = []  # a group's key, or a tensor shown alone
    for t, c in zip(tensors, candidates, strict=True):
        best = max(c, key=lambda k: fits[k[:2]], default=None)  # the first run on a tie
        if best is None or fits[best[:2]] < 2:
            order.append(t.name)
            continue
        if best[:2] not in groups:
            groups[best[:2]] = []
            order.append(best[:2])
        groups[best[:2]].append(best[2])
    types = {t.name: type_of(t) for t in tensors}
    lines: list[list] = []  # [dotted parts, numbers, type]
    for item in order:
        if isinstance(item, str):
            lines.append([[item], None, types[item]])
            continue
        (pattern, kind), numbers = item, groups[item]
        if len(numbers) == 1:  # it fit a pattern others took: alone after all
            lines.append([[pattern.replace("{}", numbers[0])], None, kind])
            continue
        parts = pattern.split(".")
        for line in lines:  # the same numbers and type, one dotted word apart: merge
            other = line[0]
            if line[1] != numbers or line[2] != kind or len(other) != len(parts):
                continue
            differ = [i for i, (a, b) in enumerate(zip(other, parts, strict=True)) if a != b]
            if len(differ) == 1 and "{}" not in other[differ[0]]:
                other[differ[0]] += "/" + parts[differ[0]]
                break
        else:
            lines.append([parts, numbers, kind])
    return [(_spell(parts, numbers), kind) for parts, numbers, kind in lines]


def _spell(parts: list[str], numbers: list[str] | None) -> str:
    name = ".".join(parts)
    if numbers is None:
        return name
    values = sorted(int(n) for n in numbers)
    ordered = sorted(numbers, key=int)
    if values == list(range(values[0], values[0] + len(values))):
        run = f"{{{ordered[0]}..{ordered[-1]}}}"
    else:
        run = "{" + ",".join(ordered) + "}"
    return name.replace("{}", run, 1)


def _print_tensors(title: str, tensors) -> None:
    lines = group_tensors(tensors)
    width = max(len(name) for name, _ in lines)
    print(f"{title}:")
    for name, kind in lines:
        print(f"  {name:<{width}}  {kind}")


def cmd_info(args) -> int:
    from hermes_ort.core.manifest import load_manifest
    from hermes_ort.measure.profiler import costs_now
    from hermes_ort.planning.layer_profile import read_profile
    from hermes_ort.streaming.integrity import Verifier

    m = load_manifest(args.model_dir)
    print(
        f"{m.name}: {m.family} / {m.task}, {m.num_layers} layers in {len(m.blocks)} blocks, "
        f"{format_bytes(m.blocks_bytes)} in block files (their length; sparse holes included)"
    )
    _print_tensors("inputs", m.inputs)
    _print_tensors("outputs", m.outputs)
    # Two sizes per block, each named: its files, and what it holds in memory once it has run
    # (the size a budget error names), as the planner counts it.
    profile = read_profile(args.model_dir)
    live = [c.live_bytes for c in costs_now(args.model_dir, m, profile, True, 0).blocks]
    print("blocks:")
    for b, resident in zip(m.blocks, live, strict=True):
        disk = format_bytes(b.bytes)
        print(
            f"  {b.name:<14} {b.kind:<9} {disk:>10} in files, {format_bytes(resident):>10} "
            f"resident when run   in {len(b.inputs)}, out {len(b.outputs)}"
        )
    if profile is None:
        print("  (resident sizes estimated from the files; `hermes-ort profile` measures them)")
    else:
        print(f"  (resident sizes measured on this machine, {profile.created})")
    verifier = Verifier(args.model_dir, "size")
    files = list(m.all_files().values())
    for f in files:
        if args.verify:
            verifier.hash_now(f)
        else:
            verifier.check(f)
    checked = "and their sha256 match" if args.verify else "with the right sizes"
    print(f"{len(files)} files present {checked}")
    return 0
