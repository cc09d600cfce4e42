"""How one ONNX Runtime session is opened, as data (sessions.py turns it into SessionOptions).

- Prepacking off keeps a block's weights file-backed (mmapped from its external data file): it
  opens in a few ms; prepacking copies each weight into an anonymous buffer first (docs/design.md
  §2.1).
- One shared arena: a fresh session grows its own arena during its first run (fresh pages, ~25 ms
  a BERT-base layer here); sessions sharing the process's arena run their first pass as fast as
  their second, and activations' memory is reused from block to block.
"""

from __future__ import annotations

from dataclasses import dataclass

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class SessionSettings:
    prepack: bool = True  # ORT's default; False keeps weights file-backed
    optimization: str = "all"  # ORT's default; "disable" for blocks optimised at export
    threads: int = 0  # 0 = every core this process may use
    shared_arena: bool = False  # allocate from the process-wide arena, not a per-session one


# ORT's default way: prepacking on, its full optimisation level (what users of plain ORT get).
ORT_DEFAULT = SessionSettings(prepack=True, optimization="all")
# The whole model with its weights mmapped, as llama.cpp maps its file: prepacking off.
WHOLE_MMAP = SessionSettings(prepack=False, optimization="all")
# The streaming way: blocks were optimised at export (portable level), weights stay mmapped.
STREAMING = SessionSettings(prepack=False, optimization="disable", shared_arena=True)
# Resident blocks worth prepacking. They share the process's arena too: with their own, each holds
# its first run's activations between passes (bert-base, 5 kept blocks: 220.6 -> 209.7 MB).
PREPACKED_STREAMING = SessionSettings(prepack=True, optimization="disable", shared_arena=True)
