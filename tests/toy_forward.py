"""The toy model's forward pass in numpy (no onnx needed: shared with the aarch64 board)."""

from __future__ import annotations

import numpy as np


def toy_forward(w: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> np.ndarray:
    """logits (B, S, V) from the toy model's weights: see tests/toy_model.py for the graph."""
    h = w["emb"][feeds["input_ids"]]  # (B, S, H)
    mask = feeds["attention_mask"].astype(np.float32)[..., None]  # (B, S, 1)
    i = 0
    while f"w{i}" in w:
        h = h + np.maximum(h @ w[f"w{i}"] + w[f"b{i}"], 0) * mask
        i += 1
    return h @ w["w_out"]
