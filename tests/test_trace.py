"""The run's timeline: every block's read-ahead, creation, wait, run and free recorded on the
thread that did it, as Chrome trace-event JSON, and nothing recorded unless asked."""

from __future__ import annotations

import json
import subprocess
import sys

import hermes_ort
from hermes_ort.core.trace import Span, chrome_trace, summarise


def test_chrome_trace_of_spans():
    spans = [
        Span("layer_00", "create", "hermes-loader_0", 1.0, 1.25),
        Span("layer_00", "run", "MainThread", 1.5, 1.75),
        Span("layer_00", "free", "hermes-daemon_0", 1.8, 1.9),
    ]
    doc = chrome_trace(spans)
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert [(e["name"], e["ts"], e["dur"]) for e in slices] == [
        ("create layer_00", 0.0, 250000.0),
        ("run layer_00", 500000.0, 250000.0),
        ("free layer_00", 800000.0, 100000.0),
    ]
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    # the inference agent is the first row, then the loaders, then the daemon
    assert names == {1: "inference agent", 2: "hermes-loader_0", 3: "hermes-daemon_0"}
    totals = summarise(spans)
    assert abs(totals["create"] - 0.25) < 1e-9 and abs(totals["wall"] - 0.9) < 1e-9


def test_a_streamed_run_is_traced_block_by_block(toy_dir):
    with hermes_ort.load(toy_dir, memory_budget="min", trace=True) as model:
        blocks = [b.name for b in model.manifest.blocks]
        streamed = {blocks[i] for i, b in enumerate(model.plan.blocks) if not b.resident}
        model.run(model.sample_inputs())
        doc = model.take_trace()
        assert [e for e in model.take_trace()["traceEvents"] if e["ph"] == "X"] == []  # taken
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    by_kind = {}
    for e in slices:
        by_kind.setdefault(e["cat"], []).append(e)
    assert [e["args"]["block"] for e in by_kind["run"]] == blocks  # in order
    assert {e["args"]["block"] for e in by_kind["create"]} == set(blocks)
    assert {e["args"]["block"] for e in by_kind["free"]} == streamed and streamed
    assert len(by_kind["open"]) == 1 and len(by_kind["pass"]) == 1
    rows = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    run_rows = {rows[e["tid"]] for e in by_kind["run"]}
    assert run_rows == {"inference agent"}
    assert {rows[e["tid"]] for e in by_kind["create"]} <= {
        r for r in rows.values() if r.startswith("hermes-loader")
    }
    runs = sorted(by_kind["run"], key=lambda e: e["ts"])  # one thread: never two runs at once
    assert all(a["ts"] + a["dur"] <= b["ts"] + 1.0 for a, b in zip(runs, runs[1:], strict=False))


def test_no_trace_unless_asked(toy_dir):
    with hermes_ort.load(toy_dir) as model:
        model.run(model.sample_inputs())
        assert [e for e in model.take_trace()["traceEvents"] if e["ph"] == "X"] == []


def test_cli_run_writes_a_trace(toy_dir, tmp_path):
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "hermes_ort", "run", str(toy_dir), "--budget", "min"]
    r = subprocess.run([*cmd, "--trace", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    kinds = {e.get("cat") for e in json.loads(out.read_text())["traceEvents"]}
    assert {"open", "create", "run", "pass"} <= kinds
    bad = tmp_path / "missing" / "run.json"
    r = subprocess.run([*cmd, "--trace", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--trace" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr
