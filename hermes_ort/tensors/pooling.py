"""Sentence embeddings from an encoder's token embeddings, pooled as its checkpoint declares:
sentence-transformers' `modules.json` (a Transformer, then Pooling, then Normalize if listed) and
the Pooling module's `config.json` (e.g. `1_Pooling/config.json`). A directory without them gets
mean pooling over the attention mask, unnormalised, and says so (`declared_by` None)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hermes_ort.core.choices import PoolingMode, values
from hermes_ort.core.errors import InputError

MODULES = "modules.json"
# sentence-transformers' older keys of the Pooling config, in the order it concatenates modes
_LEGACY_KEYS = {
    "pooling_mode_cls_token": PoolingMode.CLS,
    "pooling_mode_max_tokens": PoolingMode.MAX,
    "pooling_mode_mean_tokens": PoolingMode.MEAN,
    "pooling_mode_mean_sqrt_len_tokens": PoolingMode.MEAN_SQRT_LEN,
    "pooling_mode_weightedmean_tokens": PoolingMode.WEIGHTED_MEAN,
    "pooling_mode_lasttoken": PoolingMode.LAST_TOKEN,
}
_RUN_HERE = ("Transformer", "Pooling", "Normalize")  # the encoder's graph, then numpy


@dataclass(frozen=True)
class Pooling:
    modes: tuple[PoolingMode, ...]  # each pools [B, T, H] to [B, H]; concatenated in order
    normalize: bool  # L2-normalised after pooling (a Normalize module)
    include_prompt: bool = True  # False: a prompt's tokens are left out of the pooling
    declared_by: str | None = None  # the file that says so; None: the default

    def describe(self) -> str:
        what = "+".join(m.value for m in self.modes) + " pooling"
        what += ", normalized" if self.normalize else ""
        return f"{what} ({self.declared_by or 'default: no modules.json'})"


DEFAULT = Pooling((PoolingMode.MEAN,), normalize=False)


def read_pooling(model_dir: Path) -> Pooling:
    """The pooling the directory's sentence-transformers files declare, else `DEFAULT`.
    InputError for a module hermes-ort does not run (its embeddings would differ)."""
    modules = _read_json(model_dir / MODULES)
    if modules is None:
        return DEFAULT
    if not isinstance(modules, list):
        raise InputError(f"'{model_dir / MODULES}' is not a list of modules")
    kinds = [(str(m.get("type", "")).rsplit(".", 1)[-1], m.get("path", "")) for m in modules]
    other = [t for t, _ in kinds if t not in _RUN_HERE]
    if other:
        raise InputError(
            f"'{model_dir / MODULES}' lists {', '.join(other)}, which hermes-ort does not run "
            f"(only {', '.join(_RUN_HERE)})"
        )
    paths = [p for t, p in kinds if t == "Pooling"]
    normalize = any(t == "Normalize" for t, _ in kinds)
    if not paths:
        return Pooling(DEFAULT.modes, normalize, declared_by=MODULES)
    path = model_dir / paths[0] / "config.json"
    config = _read_json(path)
    if not isinstance(config, dict):
        raise InputError(f"'{path}' is missing or not a JSON object (modules.json names it)")
    declared = str(path.relative_to(model_dir))
    return Pooling(_modes(config, path), normalize, config.get("include_prompt", True), declared)


def _modes(config: dict, path: Path) -> tuple[PoolingMode, ...]:
    """sentence-transformers' rule: `pooling_mode` (a name or a list) if given, else the legacy
    booleans in their order, else mean."""
    given = config.get("pooling_mode")
    if given is None:
        modes = tuple(m for key, m in _LEGACY_KEYS.items() if config.get(key))
        return modes or (PoolingMode.MEAN,)
    names = [given] if isinstance(given, str) else list(given)
    try:
        return tuple(PoolingMode(n) for n in names)
    except ValueError:
        raise InputError(
            f"'{path}' has pooling_mode {given!r}; known: {', '.join(values(PoolingMode))}"
        ) from None


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read '{path}': {e}") from None


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: Pooling) -> np.ndarray:
    """[B, T, H] token embeddings and their [B, T] attention mask (right-padded) -> [B, H * modes]
    float32, as sentence-transformers computes it."""
    h = hidden.astype(np.float32, copy=False)
    m = mask.astype(np.float32)[:, :, None]  # (B, T, 1)
    out = [_pool_one(h, m, mode) for mode in pooling.modes]
    vectors = np.concatenate(out, axis=-1) if len(out) > 1 else out[0]
    if pooling.normalize:  # torch.nn.functional.normalize: x / max(|x|, 1e-12)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors.astype(np.float32, copy=False)


def _pool_one(h: np.ndarray, m: np.ndarray, mode: PoolingMode) -> np.ndarray:
    count = np.maximum(m.sum(axis=1), 1e-9)  # (B, 1)
    if mode is PoolingMode.CLS:
        first = m[:, :, 0].argmax(axis=1)  # the first real token (0 unless left-padded)
        return h[np.arange(h.shape[0]), first]
    if mode is PoolingMode.MAX:
        return np.where(m > 0, h, -np.inf).max(axis=1)
    if mode is PoolingMode.MEAN:
        return (h * m).sum(axis=1) / count
    if mode is PoolingMode.MEAN_SQRT_LEN:
        return (h * m).sum(axis=1) / np.sqrt(count)
    if mode is PoolingMode.WEIGHTED_MEAN:
        weights = m * np.arange(1, h.shape[1] + 1, dtype=np.float32)[None, :, None]
        return (h * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    # LAST_TOKEN: the last position whose mask is 1 (the last position if none is)
    real = m[:, :, 0] > 0
    last = h.shape[1] - 1 - real[:, ::-1].argmax(axis=1)
    last = np.where(real.any(axis=1), last, h.shape[1] - 1)
    return (h * m)[np.arange(h.shape[0]), last]
