"""Soak: thousands of passes on the toy model, every block's session opened and destroyed each
pass, inputs of changing shapes; resident memory, threads and open files stay flat. Slow: run
with `make test-slow` (pytest -m slow); prints the figures."""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time

import numpy as np
import pytest

import hermes_ort
from hermes_ort.streaming.memory import rss_breakdown, rss_bytes, trim_heap

PASSES = 3000
# Arenas, caches and the allocator's free lists reach their working size: with two loader
# threads, glibc's per-thread arenas settle over the first ~1000 passes (+1 MiB), then stay.
WARMUP = 1000
EVERY = 250  # passes between two samples of the settled RSS
# Flat: the median of the last 4 samples exceeds the median of the first 4 by less than this. A
# leak of 1 KiB a pass (2.2 MB over the 2250 passes between them) fails; one sample alone moves
# by up to ~2 MiB here (glibc's arenas), the medians by a few hundred KiB.
TOLERANCE_BYTES = 2 << 20
SHAPES = [(1, 16), (2, 8), (1, 64), (4, 32), (3, 5)]  # (batch, sequence) in turn


def _settled_rss() -> tuple[int, int]:
    gc.collect()
    trim_heap()
    return rss_bytes(), rss_breakdown()["anon"]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [dict(window=2, loaders=2), dict(memory_budget="min")],
    ids=["pipeload-window-2", "pipeload-min-budget"],
)
def test_thousands_of_passes_keep_memory_flat(toy_dir, options, capsys, record_property):
    with hermes_ort.load(toy_dir, **options) as model:
        feeds = [
            model.sample_inputs(batch_size=b, sequence_length=s, seed=i)
            for i, (b, s) in enumerate(SHAPES)
        ]
        first = [model.run(f)["logits"] for f in feeds]
        for k in range(WARMUP):
            model.run(feeds[k % len(feeds)])
        threads, fds = threading.active_count(), _open_fds()
        samples = [_settled_rss()]
        t0 = time.perf_counter()
        for k in range(PASSES):
            out = model.run(feeds[k % len(feeds)])["logits"]
            if (k + 1) % EVERY == 0:
                samples.append(_settled_rss())
        elapsed = time.perf_counter() - t0
        np.testing.assert_array_equal(out, first[(PASSES - 1) % len(feeds)])  # still right
        assert threading.active_count() == threads and _open_fds() == fds
        assert model.stats.max_live_sessions <= max(model.plan.window, 1) + len(model.plan.resident)
    start, end = (statistics.median(s[0] for s in part) for part in (samples[:4], samples[-4:]))
    (start_rss, start_anon), (end_rss, end_anon) = samples[0], samples[-1]
    line = (
        f"soak {'/'.join(f'{k}={v}' for k, v in options.items())}: {PASSES} passes in "
        f"{elapsed:.1f} s; RSS {start_rss / 2**20:.1f} -> {end_rss / 2**20:.1f} MiB "
        f"({(end_rss - start_rss) / 2**10:+.0f} KiB), "
        f"anonymous {start_anon / 2**20:.1f} -> {end_anon / 2**20:.1f} MiB; "
        f"median of the first / last 4 samples {start / 2**20:.1f} -> {end / 2**20:.1f} MiB "
        f"({(end - start) / 2**10:+.0f} KiB)"
    )
    with capsys.disabled():
        print("\n" + line)
    record_property("soak", line)
    assert end - start < TOLERANCE_BYTES, line
