"""Model inputs: checked against the manifest before any block runs, and sample inputs made."""

from __future__ import annotations

from typing import Any

import numpy as np

from hermes_ort.core.errors import InputError
from hermes_ort.core.manifest import Manifest, TensorSpec
from hermes_ort.tensors.kv_cache import dim_sizes


def check_inputs(manifest: Manifest, feeds: Any) -> dict[str, np.ndarray]:
    """The feeds as numpy arrays, or InputError naming the input and what was expected."""
    if not isinstance(feeds, dict):
        raise InputError(
            f"inputs must be a dict of name -> numpy array, got {type(feeds).__name__}"
        )
    expected = {t.name: t for t in manifest.inputs}
    unknown = sorted(set(feeds) - set(expected))
    if unknown:
        raise InputError(f"unknown input(s) {unknown}; the model takes {list(expected)}")
    missing = [n for n in expected if n not in feeds]
    if missing:
        raise InputError(f"missing input(s) {missing}; the model takes {list(expected)}")
    dims: dict[str, tuple[str, int]] = {}  # symbolic dim -> (first input that fixed it, its size)
    checked = {}
    for name, spec in expected.items():
        value = feeds[name]
        if not isinstance(value, np.ndarray):
            raise InputError(f"input '{name}' must be a numpy array, got {type(value).__name__}")
        if value.dtype != np.dtype(spec.dtype):
            raise InputError(f"input '{name}' has dtype {value.dtype}, expected {spec.dtype}")
        if value.ndim != len(spec.shape):
            raise InputError(
                f"input '{name}' has rank {value.ndim} (shape {value.shape}), "
                f"expected rank {len(spec.shape)} {_shape(spec)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, value.shape, strict=True)):
            if got == 0 and want not in _MAY_BE_EMPTY:
                raise InputError(f"input '{name}' is empty along axis {axis} (shape {value.shape})")
            if isinstance(want, int) and want > 0 and got != want:
                raise InputError(
                    f"input '{name}' has shape {value.shape}, expected {_shape(spec)} "
                    f"(axis {axis} must be {want})"
                )
            if isinstance(want, str):
                first = dims.setdefault(want, (name, got))
                if first[1] != got:
                    raise InputError(
                        f"input '{name}' has {want}={got} (axis {axis}) but input "
                        f"'{first[0]}' has {want}={first[1]}"
                    )
        _check_token_ids(name, spec, value)
        checked[name] = np.ascontiguousarray(value)
    _check_total_length(dims)
    limit = manifest.sample.get("max_sequence_length")
    seq = dims.get("total_sequence_length") or dims.get("sequence_length")
    if limit and seq and seq[1] > limit:
        raise InputError(
            f"input '{seq[0]}' has sequence_length {seq[1]}, longer than the model supports "
            f"({limit})"
        )
    return checked


def _check_token_ids(name: str, spec: TensorSpec, value: np.ndarray) -> None:
    """Token ids inside the vocabulary (the exporter's sample for *input_ids: randint up to the
    vocabulary size): ONNX's Gather reads a negative id from the end of the table, silently."""
    sample = spec.sample or {}
    if not name.endswith("input_ids") or sample.get("kind") != "randint" or "high" not in sample:
        return
    low, high = int(value.min()), int(value.max())
    if low < 0 or high >= sample["high"]:
        raise InputError(
            f"input '{name}' has token ids from {low} to {high}, expected "
            f"0 <= id < {sample['high']} (the vocabulary size)"
        )


_MAY_BE_EMPTY = ("past_sequence_length",)  # a decoder's KV cache is empty on the prompt pass


def _check_total_length(dims: dict[str, tuple[str, int]]) -> None:
    """A decoder's attention mask covers the cached and the new tokens."""
    if "total_sequence_length" not in dims:
        return
    name, total = dims["total_sequence_length"]
    past = dims.get("past_sequence_length", ("", 0))[1]
    seq = dims.get("sequence_length", ("", 0))[1]
    if total != past + seq:
        raise InputError(
            f"input '{name}' covers {total} positions, expected past_sequence_length + "
            f"sequence_length = {past} + {seq}"
        )


def _shape(spec: TensorSpec) -> str:
    return "[" + ", ".join(str(d) for d in spec.shape) + "]"


def sample_inputs(
    manifest: Manifest, batch_size: int = 1, sequence_length: int | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs of the manifest's sample shape (or the given one), as it describes them."""
    rng = np.random.default_rng(seed)
    sizes = dim_sizes(
        manifest.sample, batch_size, sequence_length or manifest.sample.get("sequence_length", 128)
    )
    feeds = {}
    for spec in manifest.inputs:
        shape = tuple(
            d if isinstance(d, int) and d > 0 else sizes.get(str(d), 1) for d in spec.shape
        )
        kind = (spec.sample or {}).get(
            "kind", "normal" if spec.dtype.startswith("float") else "zeros"
        )
        dtype = np.dtype(spec.dtype)
        if kind == "randint":
            value = rng.integers(0, spec.sample.get("high", 2), size=shape)
        elif kind == "ones":
            value = np.ones(shape)
        elif kind == "zeros":
            value = np.zeros(shape)
        elif kind == "arange":
            start = sizes["past_sequence_length"] if spec.name.endswith("position_ids") else 0
            value = np.broadcast_to(np.arange(start, start + shape[-1]), shape)
        else:
            value = rng.standard_normal(shape)
        feeds[spec.name] = np.ascontiguousarray(value.astype(dtype))
    return feeds
