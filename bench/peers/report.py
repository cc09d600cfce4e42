"""The peers' report from a stored run: a side-by-side table (s/token or pass time per profile),
one detailed table per profile, and a plot of s/token against the memory cap per engine; for a
real model, first its summary and the issue's targets (targets.py)."""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

from bench.peers import ENGINES


def _mb(n) -> str:
    return "-" if n is None else (f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB")


def _s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _by(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        out.setdefault((r["label"], r["profile"]), []).append(r)
    return out


def _labels(doc: dict) -> list[str]:
    """The configurations in the order of the default lists (hermes-ort's first), then others."""
    from bench.peers.run import DECODER_CONFIGS, ENCODER_CONFIGS, REAL_CONFIGS

    order: dict[str, int] = {}
    extra = ("hermes-ort:fp32:min", "hermes-ort:int8:min")
    for c in (*REAL_CONFIGS, *DECODER_CONFIGS, *ENCODER_CONFIGS, *extra):
        order.setdefault(c, len(order))
    found = list(dict.fromkeys(r["label"] for r in doc["records"]))
    return sorted(found, key=lambda label: order.get(label, len(order)))


def _median(rs: list[dict], key: str):
    values = [r[key] for r in rs if r.get("ok") and r.get(key) is not None]
    return statistics.median(values) if values else None


def _cell(rs: list[dict], key: str) -> str:
    if not rs:
        return "not run"
    if not any(r["ok"] for r in rs):
        killed = sum(r["killed_for_memory"] for r in rs)
        if killed:
            return f"**killed** ({killed}/{len(rs)})"
        error = rs[0]["error"]
        # hermes-ort refuses a budget it cannot keep, before running (the model's smallest, or a
        # generation's: "a batch of 1 x 32 positions needs at least ...")
        least = re.search(
            r"(?:smallest workable budget is|needs at least) ([0-9.]+ [kMG]?B)", error
        )
        if least:
            return f"refused (needs {least.group(1)})"
        return f"failed: {error[:60]}"
    value = _median(rs, key)
    spread = [r.get("s_per_token_range") for r in rs if r.get("ok") and r.get("s_per_token_range")]
    if key == "s_per_token" and spread:
        lo, hi = min(s[0] for s in spread), max(s[1] for s in spread)
        return f"{value:.3f} ({lo:.3f}-{hi:.3f})"
    return _s(value)


def _profile_title(doc: dict, profile: str, rs: list[dict]) -> str:
    cap = next((r["cap_bytes"] for r in rs if r.get("cap_bytes")), None)
    return f"`{profile}`" + (f" ({_mb(cap)})" if cap else "")


def side_by_side(doc: dict) -> list[str]:
    decoder = doc["model_kind"] == "decoder"
    key = "s_per_token" if decoder else "steady_pass_s"
    groups = _by(doc["records"])
    labels = _labels(doc)
    profiles = doc["profiles"]
    head = [
        "engine",
        "weights",
        *[
            _profile_title(doc, p, [r for r in doc["records"] if r["profile"] == p])
            for p in profiles
        ],
    ]
    what = "s/token, median (range)" if decoder else "steady pass"
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for label in labels:
        rs = [r for r in doc["records"] if r["label"] == label]
        weights = _mb(rs[0].get("weights_bytes"))
        cells = [_cell(groups.get((label, p), []), key) for p in profiles]
        lines.append(f"| {label} | {weights} | {' | '.join(cells)} |")
    return [f"Side by side ({what}; caps are shares of the {share_base(doc)[0]}):", "", *lines]


def share_base(doc: dict) -> tuple[str, int]:
    """What the run's share caps are shares of, and its bytes (runs stored before real models
    had only the fp32 checkpoint's)."""
    return doc.get("share_base", "fp32 checkpoint"), doc.get(
        "share_base_bytes", doc.get("fp32_bytes")
    )


def detail(doc: dict, profile: str) -> list[str]:
    decoder = doc["model_kind"] == "decoder"
    rs = [r for r in doc["records"] if r["profile"] == profile]
    if decoder:
        head = [
            "engine",
            "first token",
            "s/token",
            "tokens/s",
            "load",
            "peak RSS",
            "cgroup peak",
            "read",
            f"tokens vs {doc.get('tokens_of', 'transformers')}",
        ]
    else:
        head = [
            "engine",
            "first pass",
            "steady pass",
            "load",
            "peak RSS",
            "cgroup peak",
            "read",
            "outputs vs transformers",
        ]
    lines = [
        "",
        f"### {_profile_title(doc, profile, rs)}",
        "",
        f"| {' | '.join(head)} |",
        "|" + "---|" * len(head),
    ]
    for label, group in _by(rs).items():
        label = label[0]
        ok = [r for r in group if r["ok"]]
        if not ok:
            lines.append(f"| {label} | {_cell(group, 'x')} |" + " |" * (len(head) - 2))
            continue
        r = ok[0]
        if decoder:
            agree = (
                "-"  # no reference tokens
                if "tokens_equal" not in r
                else "equal"
                if r["tokens_equal"]
                else f"{r.get('equal_prefix')} equal, then differ"
            )
            cells = [
                _s(_median(ok, "time_to_first_token_s")),
                _cell(group, "s_per_token"),
                f"{_median(ok, 'tokens_per_s'):.2f}",
                _s(_median(ok, "load_s")),
            ]
        else:
            diff = r.get("checksum_rel_diff")
            agree = "-" if diff is None else f"{diff:.1e} (checksums, relative)"
            cells = [
                _s(_median(ok, "first_pass_s")),
                _s(_median(ok, "steady_pass_s")),
                _s(_median(ok, "load_s")),
            ]
        cells += [
            _mb(_median(ok, "peak_rss_bytes")),
            _mb(_median(ok, "cgroup_peak_bytes")),
            _mb(_median(ok, "read_bytes")),
            agree,
        ]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return lines


def render(doc: dict) -> str:
    m = doc["machine"]
    v = doc["versions"]
    engines = sorted({r["engine"] for r in doc["records"]})
    base, base_bytes = share_base(doc)
    out = [
        f"# Peers: {doc['model']} ({_mb(base_bytes)} {base})",
        "",
        f"{m['cpu']}, {m['cores']} cores, {doc['threads']} threads for every engine; "
        f"onnxruntime {v.get('onnxruntime')}, hermes-ort {v.get('git_commit', '?')}. Each "
        "configuration in a fresh process; cold profiles evict every engine's files first; a "
        "cap is the memory cgroup's hard limit (RSS + page cache); hermes-ort's budget is the "
        + (f"cap less {doc['cap_margin']:.0%}" if doc["cap_margin"] else "cap itself")
        + ". Peak RSS: the kernel's for the process; read: what its blkio group read from the "
        "disk.",
    ]
    for m in doc.get("merged", []):
        rerun = ", ".join(f"{label} {profile}" for label, profile in m["rerun"])
        out.append(f"Rerun on {m['created']} at hermes-ort {m.get('git_commit', '?')}: {rerun}.")
    if doc["model_kind"] == "decoder":
        out.append(
            f"{doc['prompt_tokens']}-token prompt, then {doc['new_tokens']['warm']} new tokens "
            f"(warm) or {doc['new_tokens']['cold']} (cold profiles), greedy, end of sequence "
            "ignored; s/token is the median of the decode steps after the first token."
        )
    from bench.peers.targets import OURS, summary, targets_table

    if any(r["label"] == OURS for r in doc["records"]):  # a real model's run
        out += ["", *summary(doc), "", *targets_table(doc)]
    out += [""] + side_by_side(doc)
    for profile in doc["profiles"]:
        out += detail(doc, profile)
    out += ["", "What each engine does:", ""]
    out += [f"- **{e}**: {ENGINES[e].about}." for e in engines if e in ENGINES]
    for label, why in doc.get("skipped", {}).items():
        out.append(f"- skipped {label}: {why}")
    return "\n".join(out) + "\n"


def plot(doc: dict, path: Path) -> Path | None:
    """s/token (or pass time) against the cap, one line per engine; warm at the right."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    decoder = doc["model_kind"] == "decoder"
    key = "s_per_token" if decoder else "steady_pass_s"
    caps = {}  # cold profile -> its cap in bytes, largest first
    for r in doc["records"]:
        if r["profile"].startswith("cold:") and r.get("cap_bytes"):
            caps[r["profile"]] = r["cap_bytes"]
    caps = dict(sorted(caps.items(), key=lambda kv: -kv[1]))
    if not caps:  # no cold profile with a cap: nothing to plot
        return None
    fig, ax = plt.subplots(figsize=(9.5, 5))
    colours = plt.get_cmap("tab20").colors
    labels = _labels(doc)
    for k, label in enumerate(labels):
        xs, ys = [], []
        for x, p in enumerate(caps):
            rs = [r for r in doc["records"] if r["label"] == label and r["profile"] == p]
            value = _median(rs, key)
            if value is not None:
                xs.append(x)
                ys.append(value)
        if ys:
            ours = label.startswith("hermes-ort")
            ax.plot(
                xs,
                ys,
                marker="os^vD<>"[k % 7],
                color=colours[(2 * k) % 20 if k < 10 else (2 * k + 1) % 20],
                linestyle="-" if ours else "--",
                linewidth=2.4 if ours else 1.2,
                label=label,
            )
    ax.set_xticks(range(len(caps)), [f"{p.split(':')[1]}\n{_mb(b)}" for p, b in caps.items()])
    ax.set_yscale("log")
    ax.set_xlabel("memory cap (RSS + page cache), cold start; a missing point: killed")
    ax.set_ylabel("s/token (median)" if decoder else "steady pass (s)")
    ax.set_title(f"{doc['model']}: every engine under the same caps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(doc: dict[str, Any], out: Path, stem: str) -> str:
    text = render(doc)
    (out / f"{stem}.md").write_text(text)
    plot(doc, out / f"{stem}.png")
    return text
