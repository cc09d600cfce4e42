"""Markdown from a stored `bench serve` run (run.py's JSON): per cap, tokens/s by client count for
every server with its speed-up over one client and peak RSS, then the details and the issue's
targets; for `--load`, one table of latency, tokens/s, errors and memory against the budget."""

from __future__ import annotations

import re
from typing import Any

from bench.render import fmt_bytes
from bench.serving.run import KIND_TITLES, TARGET_CLIENTS, TARGET_SPEEDUP


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]


def tokens_per_s(r: dict | None) -> float | None:
    """A point's tokens/s, None when its server did not serve the load (or answered errors only)."""
    if not r or not r.get("load") or r["load"]["completion_tokens"] == 0:
        return None
    return r["load"]["tokens_per_s"]


# hermes-ort refuses a budget it cannot keep before it serves, naming the least it needs
REFUSAL = re.compile(r"(?:smallest workable budget is|needs at least) ([0-9.]+ [kMG]?B)")


def failure(r: dict | None) -> str:
    if r is None:
        return "not run"
    if r["server"].get("killed_for_memory"):
        return "**killed**"
    refused = REFUSAL.search(r.get("error") or "")
    return f"refused (needs {refused.group(1)})" if refused else "**failed**"


def speed_cell(r: dict | None) -> str:
    tps = tokens_per_s(r)
    if tps is None:
        return failure(r)
    errors = r["load"]["errors"]
    return f"{tps:.1f}" + (f" ({errors} errors)" if errors else "")


def speedup(r: dict | None, one: dict | None) -> float | None:
    a, b = tokens_per_s(r), tokens_per_s(one)
    return a / b if a is not None and b else None


def index(doc: dict) -> dict[tuple[str, str, int], dict]:
    return {(r["cap"], r["kind"], r["clients"]): r for r in doc["records"]}


def header(doc: dict) -> list[str]:
    m, v = doc["machine"], doc["versions"]
    plan = doc.get("hermes_plan_min") or {}
    lines = [
        f"{m['cpu']}, {doc['threads']} cores pinned and {doc['threads']} threads for every server; "
        f"hermes-ort {v.get('git_commit', v.get('hermes_ort'))}, onnxruntime {v['onnxruntime']}.",
        f"Model: {doc['model']}, GGUF {fmt_bytes(doc['gguf_bytes'])} (llama-server, "
        "llama_cpp.server); hermes-ort serves its export "
        f"({fmt_bytes(doc['hermes_weights_bytes'])}).",
        f"Requests per client: {doc['requests_per_client']}, back to back, {doc['max_tokens']} "
        f"new tokens each at temperature 0 (end of sequence ignored by the llama.cpp servers: "
        f"{doc['ignore_eos']}), "
        f"{len(doc['prompts'])} prompts in turn; "
        f"{'streamed' if doc['stream'] else 'not streamed'}; "
        f"{doc['ctx']} positions per sequence; max batch / slots: {doc['max_batch']} "
        "(auto: the client count).",
        "tokens/s: the responses' usage.completion_tokens over the wall time; a fresh server per "
        "row, one warm-up request first. A cap is the memory cgroup's hard limit (RSS + page "
        "cache), the model's files evicted before each start; hermes-ort's budget is "
        f"cap/(1+{doc['cap_margin']}). Peak RSS: VmHWM/VmRSS sampled every 20 ms.",
    ]
    if plan.get("smallest_budget_bytes"):
        lines.append(
            f"hermes-ort's smallest workable budget (`plan --budget min`, one sequence): "
            f"{fmt_bytes(plan['smallest_budget_bytes'])}; whole model resident: "
            f"{fmt_bytes(plan.get('whole_model_resident_bytes'))}."
        )
    for kind, why in doc.get("skipped", {}).items():
        lines.append(f"Skipped {kind}: {why}.")
    if not doc["emulation"].get("memory_cgroup"):
        lines.append(f"**Caps not enforced**: {doc['emulation'].get('memory_cgroup_missing')}.")
    return [" ".join(lines[:4]), "", *lines[4:]]


def cap_title(doc: dict, cap: dict) -> str:
    if cap["bytes"] is None:
        return "## No cap"
    share = cap["bytes"] / doc["gguf_bytes"]
    return f"## Cap `{cap['text']}`: {fmt_bytes(cap['bytes'])} ({share:.0%} of the GGUF file)"


def summary_table(doc: dict, cap: str, kinds: list[str]) -> list[str]:
    at = index(doc)
    head = ["clients"]
    for k in kinds:
        head += [f"{KIND_TITLES.get(k, k)} tokens/s", "vs 1 client", "peak RSS"]
    rows = []
    for n in doc["clients"]:
        row = [str(n)]
        for k in kinds:
            r, one = at.get((cap, k, n)), at.get((cap, k, 1))
            rss = r["server"]["peak_rss_bytes"] if r else None
            row += [speed_cell(r), fmt_x(speedup(r, one)), fmt_bytes(rss)]
        rows.append(row)
    return table(head, rows)


def detail_table(doc: dict, cap: str, kinds: list[str]) -> list[str]:
    at = index(doc)
    head = ["server", "clients", "requests", "errors", "tokens/request", "wall", "tokens/s"]
    head += ["p50", "p95"]
    head += ["first token p50", "peak RSS", "VmHWM at stop", "cgroup peak", "start", "exit"]
    rows = []
    for k in kinds:
        for n in doc["clients"]:
            r = at.get((cap, k, n))
            if r is None:
                continue
            s, load = r["server"], r.get("load") or {}
            exit_text = f"{s['stopped_by']} {s['exit_code']}" if s.get("stopped_by") else "-"
            rows.append(
                [
                    k,
                    str(n),
                    str(load.get("requests", 0)),
                    str(load.get("errors", "-")),
                    _per_request(load),
                    fmt_s(load.get("wall_s")),
                    f"{load['tokens_per_s']:.1f}" if load else failure(r),
                    fmt_s(load.get("latency_p50_s")),
                    fmt_s(load.get("latency_p95_s")),
                    fmt_s(load.get("ttft_p50_s")),
                    fmt_bytes(s.get("peak_rss_bytes")),
                    fmt_bytes(s.get("vmhwm_at_stop_bytes")),
                    fmt_bytes(s.get("cgroup_peak_bytes")),
                    fmt_s(s.get("startup_s")),
                    exit_text,
                ]
            )
    return table(head, rows)


def _per_request(load: dict) -> str:
    ok = load.get("requests", 0) - load.get("errors", 0)
    return f"{load['completion_tokens'] / ok:.1f}" if ok > 0 else "-"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**met**" if ok else "**missed**")


def targets(doc: dict, cap: str) -> list[str]:
    """The issue's: hermes at 8 clients >= 5x its tokens/s at 1, and ahead of both llama.cpp
    servers at 8 clients."""
    at, n = index(doc), TARGET_CLIENTS
    hermes, one = at.get((cap, "hermes", n)), at.get((cap, "hermes", 1))
    x = speedup(hermes, one)
    rows = [
        [
            f"hermes, {n} clients vs 1",
            f">= {TARGET_SPEEDUP:.0f}x",
            fmt_x(x),
            verdict(None if x is None else x >= TARGET_SPEEDUP),
        ]
    ]
    for peer in ("llama-server", "llama-cpp-python"):
        mine, theirs = tokens_per_s(hermes), tokens_per_s(at.get((cap, peer, n)))
        ratio = mine / theirs if mine is not None and theirs else None
        ok = None if mine is None and theirs is None else (mine or 0) > (theirs or 0)
        rows.append(
            [
                f"hermes vs {KIND_TITLES[peer]}, {n} clients",
                "ahead",
                f"{fmt_x(ratio)} ({_f(mine)} vs {_f(theirs)} tokens/s)",
                verdict(ok),
            ]
        )
    return table(["target", "wanted", "measured", "verdict"], rows)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def problems(doc: dict) -> list[str]:
    out = []
    for r in doc["records"]:
        s = r["server"]
        if r.get("error") or (r.get("load") or {}).get("errors"):
            first = (r.get("load") or {}).get("error_messages") or [r.get("error")]
            where = f"{r['cap']} {r['kind']} {r['clients']} clients"
            out.append(f"- {where}: {first[0]} (log: {s['log_path']})")
        elif not s.get("stopped_cleanly"):
            out.append(
                f"- {r['cap']} {r['kind']} {r['clients']} clients: did not stop cleanly on "
                f"SIGTERM ({s.get('stopped_by')}, exit {s.get('exit_code')})"
            )
    return out


def render_bench(doc: dict[str, Any]) -> str:
    kinds = [k for k in doc["servers"] if any(r["kind"] == k for r in doc["records"])]
    lines = [
        f"# Serving: {doc['model']}, tokens/s at {', '.join(map(str, doc['clients']))} clients"
    ]
    lines += ["", *header(doc)]
    for cap in doc["caps"]:
        lines += ["", cap_title(doc, cap), "", *summary_table(doc, cap["text"], kinds)]
        if has_target_counts(doc) and "hermes" in kinds:
            lines += ["", "Targets:", "", *targets(doc, cap["text"])]
        lines += ["", "Details:", "", *detail_table(doc, cap["text"], kinds)]
    trouble = problems(doc)
    if trouble:
        lines += ["", "Errors and failures:", "", *trouble]
    return "\n".join(lines) + "\n"


def has_target_counts(doc: dict) -> bool:
    """Whether the run has the client counts the issue's targets compare (1 and 8)."""
    return 1 in doc["clients"] and TARGET_CLIENTS in doc["clients"]


def render_load(doc: dict[str, Any]) -> str:
    """The load test: one row per cap (hermes only)."""
    lines = [f"# Load test: {doc['model']} on hermes-ort's server", "", *header(doc), ""]
    head = ["cap", "budget", "clients x requests", "requests", "errors", "tokens/s", "p50", "p95"]
    head += ["first token p50 / p95", "peak RSS", "peak RSS / budget", "cgroup peak"]
    head += ["0 errors", "peak RSS within budget"]
    rows = []
    for r in doc["records"]:
        s, load = r["server"], r.get("load") or {}
        budget = s.get("budget_bytes")
        rss = s.get("peak_rss_bytes")
        ttft = f"{fmt_s(load.get('ttft_p50_s'))} / {fmt_s(load.get('ttft_p95_s'))}"
        rows.append(
            [
                r["cap"],
                fmt_bytes(budget),
                f"{r['clients']} x {doc['requests_per_client']}",
                str(load.get("requests", 0)),
                str(load.get("errors", "-")),
                f"{load['tokens_per_s']:.1f}" if load else failure(r),
                fmt_s(load.get("latency_p50_s")),
                fmt_s(load.get("latency_p95_s")),
                ttft if doc["stream"] else "-",
                fmt_bytes(rss),
                f"{rss / budget:.2f}" if rss and budget else "-",
                fmt_bytes(s.get("cgroup_peak_bytes")),
                verdict(r["ok"]),
                verdict(rss <= budget if rss and budget and load else None),
            ]
        )
    lines += table(head, rows)
    trouble = problems(doc)
    if trouble:
        lines += ["", "Errors and failures:", "", *trouble]
    return "\n".join(lines) + "\n"
