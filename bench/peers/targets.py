"""A real model's headline (#24): a summary row per configuration and the issue's targets for
hermes-ort's export of the GGUF (`hermes-ort:gguf`) against llama.cpp, checked from a stored run:

- warm decoding: hermes-ort's tokens/s >= 0.9x llama.cpp's on the file as shipped (q4_1);
- warm peak RSS: hermes-ort's <= 1.3x llama.cpp's (q4_1);
- hermes-ort's smallest workable budget (`hermes-ort plan --budget min`) <= 1.3x llama.cpp's warm
  peak RSS (q4_1);
- under every cap below the file's size: hermes-ort >= 1.5x faster (s/token) than llama.cpp's best
  setting there (any format, with or without repacking) that was not killed.

llama.cpp's q4_1 figure is the better of its two settings (with and without load-time
repacking) for each figure, the stricter comparison. A target is "met" or "missed"; one whose
figures were not measured (an engine not installed, a profile not run) says "not measured"."""

from __future__ import annotations

from dataclasses import dataclass

from bench.peers.report import _by, _cell, _labels, _mb, _median, share_base

OURS = "hermes-ort:gguf"
SPEED_RATIO = 0.9  # hermes-ort's warm tokens/s at least this share of llama.cpp's
RSS_RATIO = 1.3  # hermes-ort's warm peak RSS, and its smallest budget, at most this x llama.cpp's
CAPPED_SPEEDUP = 1.5  # under a cap below the file: at least this x faster than llama.cpp's best


@dataclass(frozen=True)
class Target:
    what: str
    want: str  # the target, as the issue states it
    ours: str  # hermes-ort's figure
    theirs: str  # llama.cpp's, and which configuration gave it
    ratio: str  # hermes-ort's figure over llama.cpp's, as the target compares them
    met: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return "not measured" if self.met is None else ("met" if self.met else "missed")


def shipped(doc: dict) -> str:
    """llama.cpp's configuration of the file as shipped (its reference tokens' run)."""
    return doc.get("tokens_of") or "llama.cpp:q4_1"


def _records(doc: dict, label: str, profile: str) -> list[dict]:
    return _by(doc["records"]).get((label, profile), [])


def _best(doc: dict, labels: list[str], profile: str, key: str, lowest: bool):
    """(the best median of `key` among `labels` in `profile`, its label), or (None, None)."""
    found = [(_median(_records(doc, lb, profile), key), lb) for lb in labels]
    found = [(v, lb) for v, lb in found if v is not None]
    if not found:
        return None, None
    return min(found) if lowest else max(found)


def smallest_budget(doc: dict, label: str = OURS) -> int | None:
    return (doc.get("smallest_budget_bytes") or {}).get(label, {}).get("smallest_budget_bytes")


def capped_below_file(doc: dict) -> list[str]:
    """The run's profiles whose memory cap is below the GGUF file's size."""
    from bench.matrix import parse_profile

    base = share_base(doc)[1]
    out = []
    for text in doc["profiles"]:
        cap = parse_profile(text).memory_cap
        if cap and cap.kind in ("model", "bytes") and cap.resolve(base, 0) < base:
            out.append(text)
    return out


def _ratio_target(what, want, ours, theirs, label, limit, at_least, show) -> Target:
    if ours is None or theirs is None:
        return Target(what, want, show(ours), show(theirs), "-", None)
    ratio = ours / theirs
    met = ratio >= limit if at_least else ratio <= limit
    return Target(what, want, show(ours), f"{show(theirs)} ({label})", f"{ratio:.2f}x", met)


def _tokens_per_s(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def capped_target(doc: dict, profile: str) -> Target:
    """hermes-ort against llama.cpp's fastest configuration that ran under `profile`'s cap."""
    llama = sorted({r["label"] for r in doc["records"] if r["engine"] == "llama.cpp"})
    want = f">= {CAPPED_SPEEDUP}x faster than llama.cpp's best not killed"
    what = f"s/token under `{profile}`"
    ours = _median(_records(doc, OURS, profile), "s_per_token")
    theirs, label = _best(doc, llama, profile, "s_per_token", lowest=True)
    tried = [lb for lb in llama if _records(doc, lb, profile)]
    ours_text = f"{ours:.3f}" if ours is not None else _cell(_records(doc, OURS, profile), "")
    if not _records(doc, OURS, profile) or not tried:
        return Target(what, want, ours_text, "not run" if not tried else "-", "-", None)
    if theirs is None:  # every llama.cpp setting killed (or failed): running at all is faster
        killed = sum(
            all(r["killed_for_memory"] for r in _records(doc, lb, profile)) for lb in tried
        )
        theirs_text = f"none ran ({killed}/{len(tried)} killed)"
        return Target(what, want, ours_text, theirs_text, "-", ours is not None)
    if ours is None:
        return Target(what, want, ours_text, f"{theirs:.3f} ({label})", "-", False)
    speedup = theirs / ours
    met = speedup >= CAPPED_SPEEDUP
    return Target(what, want, ours_text, f"{theirs:.3f} ({label})", f"{speedup:.2f}x", met)


def check(doc: dict) -> list[Target]:
    """Every target of the issue, from a stored run of a real model."""
    ref = shipped(doc)
    variants = sorted({r["label"] for r in doc["records"] if r["label"].startswith(ref)})
    ours_speed = _median(_records(doc, OURS, "warm"), "tokens_per_s")
    speed, speed_label = _best(doc, variants, "warm", "tokens_per_s", lowest=False)
    ours_rss = _median(_records(doc, OURS, "warm"), "peak_rss_bytes")
    rss, rss_label = _best(doc, variants, "warm", "peak_rss_bytes", lowest=True)
    out = [
        _ratio_target(
            "warm decoding, tokens/s",
            f">= {SPEED_RATIO}x {ref}'s",
            ours_speed,
            speed,
            speed_label,
            SPEED_RATIO,
            True,
            _tokens_per_s,
        ),
        _ratio_target(
            "warm peak RSS",
            f"<= {RSS_RATIO}x {ref}'s",
            ours_rss,
            rss,
            rss_label,
            RSS_RATIO,
            False,
            _mb,
        ),
        _ratio_target(
            "smallest workable budget (`plan --budget min`)",
            f"<= {RSS_RATIO}x {ref}'s warm peak RSS",
            smallest_budget(doc),
            rss,
            rss_label,
            RSS_RATIO,
            False,
            _mb,
        ),
    ]
    return out + [capped_target(doc, p) for p in capped_below_file(doc)]


def targets_table(doc: dict) -> list[str]:
    head = ["target", "wanted", OURS, "llama.cpp", "ratio", "verdict"]
    lines = [
        f"Targets (#24; {shipped(doc)}'s figure: the better of its two settings, with and "
        "without repacking):",
        "",
        f"| {' | '.join(head)} |",
        "|" + "---|" * len(head),
    ]
    for t in check(doc):
        cells = [t.what, t.want, t.ours, t.theirs, t.ratio, f"**{t.verdict}**"]
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def _not_run(doc: dict, label: str) -> str:
    """The profiles where no run of `label` finished, by why (killed, refused, failed)."""
    why: dict[str, list[str]] = {}
    for profile in doc["profiles"]:
        rs = _records(doc, label, profile)
        if rs and not any(r["ok"] for r in rs):
            cell = _cell(rs, "")
            kind = "killed" if "killed" in cell else cell.split(" ", 1)[0].rstrip(":")
            why.setdefault(kind, []).append(f"`{profile}`")
    return "; ".join(f"{k}: {', '.join(ps)}" for k, ps in why.items()) or "none"


def summary(doc: dict) -> list[str]:
    """One row per configuration: its warm figures, its smallest workable budget (hermes-ort),
    and the profiles it did not finish under."""
    head = [
        "configuration",
        "weights",
        "warm s/token",
        "warm tokens/s",
        "warm peak RSS",
        "smallest workable budget",
        "did not finish",
    ]
    lines = [
        "Summary (warm: median over the decode steps and repeats; smallest workable budget: "
        "`hermes-ort plan --budget min`, beside llama.cpp's warm peak RSS):",
        "",
        f"| {' | '.join(head)} |",
        "|" + "---|" * len(head),
    ]
    for label in _labels(doc):
        warm = _records(doc, label, "warm")
        weights = next(
            (r.get("weights_bytes") for r in doc["records"] if r["label"] == label), None
        )
        least = smallest_budget(doc, label)
        cells = [
            label,
            _mb(weights),
            _cell(warm, "s_per_token"),
            _tokens_per_s(_median(warm, "tokens_per_s")),
            _mb(_median(warm, "peak_rss_bytes")),
            _mb(least) if least else "-",
            _not_run(doc, label),
        ]
        lines.append(f"| {' | '.join(cells)} |")
    return lines
