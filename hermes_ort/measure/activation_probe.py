"""Activation probes: every block run at a few shapes, the shared arena shrunk after each run,
so the transient of each shape is what that run really needed (docs/design.md §2, activations at
a batch; the arena otherwise keeps its high-water mark and hides the next shape's growth).

Shapes: the sample (1 x p), PROBE_ROWS x p and 1 x 2p fit the terms of activation_model.py;
PROBE_ROWS x 2p checks the fit on a shape it was not made from, then joins it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hermes_ort.core.choices import BlockKind
from hermes_ort.core.manifest import Manifest
from hermes_ort.core.settings import PREPACKED_STREAMING, STREAMING
from hermes_ort.planning.activation_model import ActivationFit, ActivationPoint
from hermes_ort.planning.layer_profile import BlockProfile
from hermes_ort.streaming.daemon import destroy
from hermes_ort.streaming.integrity import Verifier
from hermes_ort.streaming.loader import LiveBlock
from hermes_ort.streaming.memory import peak_rss_bytes, reset_peak_rss, rss_bytes, trim_heap
from hermes_ort.streaming.sessions import create_session, shrinking_run_options
from hermes_ort.tensors.dataflow import Tensors
from hermes_ort.tensors.inputs import sample_inputs

PROBE_ROWS = 4


def probe_shapes(manifest: Manifest, positions: int) -> list[tuple[int, int]]:
    """(rows, positions) to probe: the last one checks the fit made from the others."""
    most = int(manifest.sample.get("max_sequence_length") or 0) or 4 * positions
    longer = min(2 * positions, most)
    if longer <= positions:  # the sample is the longest the model takes: probe a shorter one
        longer = max(1, positions // 2)
    return [(1, positions), (PROBE_ROWS, positions), (1, longer), (PROBE_ROWS, longer)]


def _transients(verifier: Verifier, manifest: Manifest, rows: int, positions: int) -> list[int]:
    """Each block's transient bytes at rows x positions (inputs flowing from block to block)."""
    feeds = sample_inputs(manifest, rows, positions)
    tensors = Tensors(manifest, feeds)
    options = shrinking_run_options()
    out: list[int] = []
    for i, spec in enumerate(manifest.blocks):
        allowed = [verifier.check(f) for f in spec.files]
        # as the engine runs it: MatMulNBits blocks prepacked (unpacked, every run dequantizes
        # the whole weight into a transient fp32 copy the engine never makes)
        packed = manifest.packed_weights and spec.kind != BlockKind.PROLOGUE
        settings = PREPACKED_STREAMING if packed else STREAMING
        session = create_session(
            Path(verifier.model_dir) / spec.path, settings, f"block '{spec.name}'", allowed
        )
        names, inputs = list(spec.outputs), tensors.inputs_of(i)
        # its weights' pages in; the arena shrunk after, but for the region its outputs held,
        # which the measured run reuses for its own outputs: what it adds is its intermediates
        session.run(names, inputs, options)
        trim_heap()
        before = rss_bytes()
        reset_peak_rss()
        values = session.run(names, inputs, options)
        out.append(max(0, peak_rss_bytes() - before))
        tensors.put(i, values)
        destroy(LiveBlock(i, spec, session), verifier.model_dir, False, set())
        del session
    tensors.clear()
    return out


def probe_activations(
    verifier: Verifier, manifest: Manifest, positions: int, blocks: list[BlockProfile]
) -> list[BlockProfile]:
    """The blocks' profiles with their activation points and the fit's check."""
    shapes = probe_shapes(manifest, positions)
    measured = [_transients(verifier, manifest, r, p) for r, p in shapes]
    out = []
    for i, block in enumerate(blocks):
        points = tuple(
            ActivationPoint(r, p, m[i]) for (r, p), m in zip(shapes, measured, strict=True)
        )
        made_from = ActivationFit.fit(points[:-1])
        last = points[-1]
        check = (
            last.rows,
            last.positions,
            made_from.at(last.rows, last.positions),
            last.transient_bytes,
        )
        out.append(
            dataclasses.replace(
                block,
                activation_points=tuple((p.rows, p.positions, p.transient_bytes) for p in points),
                activation_check=check,
            )
        )
    return out
