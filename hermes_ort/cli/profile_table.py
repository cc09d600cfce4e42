"""`hermes-ort profile`'s table: what the profiler and calibration measured, block by block."""

from __future__ import annotations

from hermes_ort.core.units import format_bytes
from hermes_ort.planning.layer_profile import Profile


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def print_profile(profile: Profile) -> None:
    p = profile
    print(
        f"baseline RSS {format_bytes(p.baseline_bytes)} (+{format_bytes(p.warmup_bytes)} at the "
        f"first session), pipelining +{format_bytes(p.engine_overhead_bytes)}, kept blocks "
        f"+{p.kept_overhead:.1%}, first pass +{p.first_pass_extra_s * 1000:.0f} ms, streaming "
        f"passes x{p.stream_pass_scale:.2f}, storage read "
        f"{p.read_bandwidth_bytes_per_s / 1e6:.0f} MB/s, batch 1, sequence {p.sequence_length}"
    )
    print(
        "| block | on disk | read cold / warm | create / prepacked | 1st run | run / prepacked "
        "| resident when run | opened, not run | transient |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for b in p.blocks:
        print(
            f"| {b.name} | {format_bytes(b.file_bytes)} "
            f"| {_ms(b.readahead_cold_s)} / {_ms(b.readahead_warm_s)} ms "
            f"| {_ms(b.create_s)} / {_ms(b.create_prepack_s)} ms | {_ms(b.first_run_s)} ms "
            f"| {_ms(b.run_s)} / {_ms(b.run_prepack_s)} ms | {format_bytes(b.live_bytes)} "
            f"| {format_bytes(b.open_bytes)} | {format_bytes(b.transient_bytes)} |"
        )
