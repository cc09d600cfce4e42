"""The whole-model engine: one session of the whole-model file, opened on the first run and kept
(the `full` and `full-mmap` baselines). Which file and how it is opened is the plan's.

Its one session computes every position's logits; asked for the last position's, it returns
those alone (the same values; the memory of the whole ones is not saved)."""

from __future__ import annotations

import time

import numpy as np

from hermes_ort.core.manifest import Manifest
from hermes_ort.core.stats import BlockStats, RunStats
from hermes_ort.core.trace import Trace
from hermes_ort.planning.plan import Plan
from hermes_ort.streaming.integrity import Verifier
from hermes_ort.streaming.memory import PassMeasure, rss_bytes, trim_heap
from hermes_ort.streaming.sessions import create_session, run_session
from hermes_ort.tensors.kv_cache import decoder_signature
from hermes_ort.tensors.last_position import last_logits_only


class WholeEngine:
    def __init__(
        self, manifest: Manifest, plan: Plan, verifier: Verifier, trace: Trace | None = None
    ):
        self.verifier = verifier
        self.trace = trace or Trace(enabled=False)
        self.manifest = manifest
        self.plan = plan
        self.session = None
        sig = decoder_signature(manifest)
        self.logits = sig.logits if sig else None  # encoders: never cut

    def run(
        self, feeds: dict[str, np.ndarray], last_logits: bool = False
    ) -> tuple[dict[str, np.ndarray], RunStats]:
        """One pass; `last_logits`: a decoder's logits at the last position, [rows, 1, vocab]."""
        names = list(self.manifest.output_names)
        create_s = 0.0
        spec = self.plan.whole
        with PassMeasure() as m:
            if self.session is None:
                t0 = time.perf_counter()
                paths = [self.verifier.check(f) for f in spec.files]
                path = self.verifier.model_dir / spec.path
                self.session = create_session(
                    path, self.plan.whole_settings, "the whole model", paths, self.verifier
                )
                create_s = time.perf_counter() - t0
                self.trace.add("full", "create", t0, t0 + create_s)
            t1 = time.perf_counter()
            values = run_session(self.session, names, feeds, "the whole model")
            run_s = time.perf_counter() - t1
            self.trace.add("full", "run", t1, t1 + run_s)
        block = BlockStats("full", create_s == 0.0, 0.0, 0.0, create_s, run_s)
        stats = RunStats(
            strategy=self.plan.strategy,
            loaders=0,
            window=1,
            latency_s=m.latency_s,
            peak_rss_bytes=m.peak,
            rss_before_bytes=m.rss_before,
            rss_after_bytes=rss_bytes(),
            bytes_read=m.bytes_read,
            max_live_sessions=1,
            blocks=(block,),
        )
        outputs = dict(zip(names, values, strict=True))
        if last_logits and self.logits is not None:
            outputs = last_logits_only(outputs, self.logits)
        return outputs, stats

    def close(self) -> None:
        self.session = None
        trim_heap()
