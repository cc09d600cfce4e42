"""Verification: the chained blocks (and the full model file) against the PyTorch model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from hermes_ort.core.manifest import Manifest, TensorSpec
from hermes_ort.export.errors import ExportError
from hermes_ort.tensors.dataflow import Tensors

TOLERANCE_FP32 = 1e-4
SAMPLE_SEED = 0


def make_sample(
    inputs: Sequence[TensorSpec], sizes: dict[str, int], seed: int = SAMPLE_SEED
) -> dict[str, np.ndarray]:
    """A random value for every model input, following each input's `sample` description."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in inputs:
        try:
            shape = tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)
        except KeyError as e:
            raise ExportError(f"input '{spec.name}': no sample size for dim {e}") from None
        dtype = np.dtype(spec.dtype)
        kind = (spec.sample or {}).get("kind", "zeros")
        if kind == "randint":
            value = rng.integers(0, spec.sample["high"], size=shape).astype(dtype)
        elif kind == "ones":
            value = np.ones(shape, dtype)
        elif kind == "arange":
            value = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        elif kind == "normal":
            value = rng.standard_normal(shape).astype(dtype)
        else:
            value = np.zeros(shape, dtype)
        feed[spec.name] = value
    return feed


def torch_outputs(
    model: Any, feed: dict[str, np.ndarray], names: Iterable[str]
) -> dict[str, np.ndarray]:
    import torch

    # An empty KV cache is the same as none (transformers wants a Cache object, not arrays).
    kwargs = {
        k: torch.from_numpy(v)
        for k, v in feed.items()
        if not (k.startswith("past_key_values.") and v.size == 0)
    }
    try:
        with torch.no_grad():
            out = model(**kwargs)
        return {name: _output(out, name).detach().numpy().copy() for name in names}
    except (KeyError, TypeError, RuntimeError) as e:
        raise ExportError(f"cannot run the PyTorch model on the sample input: {e!r}") from None


def _output(out: Any, name: str):
    """A named output; `present.i.key/value` are layer i of the returned KV cache."""
    if not name.startswith("present."):
        return out[name]
    _, layer, kind = name.split(".")
    cache = out["past_key_values"]
    if hasattr(cache, "layers"):  # transformers >= 4.56: one entry per layer
        entry = cache.layers[int(layer)]
        return entry.keys if kind == "key" else entry.values
    return cache[int(layer)][0 if kind == "key" else 1]


def session_options() -> ort.SessionOptions:
    """No spinning thread pools; no prepacking, so weights stay mmapped (fast to open, small)."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def run_blocks(
    model_dir: Path,
    manifest: Manifest,
    feed: dict[str, np.ndarray],
    step: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """Chain the blocks one session at a time, routing tensors by name (the runtime's dataflow);
    each intermediate tensor is dropped after its last consumer."""
    tensors = Tensors(manifest, feed)
    for i, block in enumerate(manifest.blocks):
        try:
            session = ort.InferenceSession(
                str(model_dir / block.path), session_options(), providers=["CPUExecutionProvider"]
            )
            values = session.run(list(block.outputs), tensors.inputs_of(i))
        except Exception as e:  # onnxruntime's Fail/InvalidArgument/... types
            raise ExportError(f"verification failed: block '{block.name}' does not run: {e}") from e
        del session
        tensors.put(i, values)
        if step:
            step(block.name)
    return tensors.outputs()


def run_full(
    model_dir: Path, manifest: Manifest, feed: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    path = model_dir / manifest.full_model.path
    try:
        session = ort.InferenceSession(
            str(path), session_options(), providers=["CPUExecutionProvider"]
        )
        values = session.run(list(manifest.output_names), feed)
    except Exception as e:  # onnxruntime's Fail/InvalidArgument/... types
        raise ExportError(f"verification failed: the full model does not run: {e}") from e
    return dict(zip(manifest.output_names, values, strict=True))


def max_abs_diff(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    diffs = {}
    for name, ref in want.items():
        if got[name].shape != ref.shape:
            raise ExportError(
                f"output '{name}': shape {got[name].shape} differs from PyTorch's {ref.shape}"
            )
        diffs[name] = float(np.max(np.abs(got[name].astype(np.float64) - ref))) if ref.size else 0.0
    return diffs


def accuracy(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per output: max abs diff and cosine similarity with the reference; for logits, how often
    the top-1 over the vocabulary agrees."""
    out = {}
    max_abs = max_abs_diff(got, want)
    for name, ref in want.items():
        a, b = got[name].astype(np.float64).reshape(-1), ref.astype(np.float64).reshape(-1)
        norm = float(np.linalg.norm(a) * np.linalg.norm(b))
        record = {"max_abs_diff": max_abs[name], "cosine": float(a @ b / norm) if norm else 1.0}
        if name == "logits":
            record["top1"] = float(np.mean(got[name].argmax(-1) == ref.argmax(-1)))
        out[name] = record
    return out
