"""Sentence embeddings with an encoder exported for feature-extraction, as sentence-transformers
computes them: texts tokenized with the model's tokenizer.json (cut to the checkpoint's
max_seq_length, right-padded per batch), run in batches longest first, the last hidden state
pooled as the checkpoint declares (tensors/pooling.py). Both models' `embed` is `embed_texts`
over their own `run`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from hermes_ort.core.errors import InputError
from hermes_ort.core.manifest import Manifest
from hermes_ort.generation.tokenizer import TextTokenizer, load_tokenizer, read_json, special_tokens
from hermes_ort.tensors.pooling import pool, read_pooling

HIDDEN = "last_hidden_state"  # optimum's feature-extraction output: token embeddings [B, T, H]


class PoolingNotDeclared(UserWarning):
    """The model directory declares no pooling (no sentence-transformers modules.json)."""


@dataclass(frozen=True)
class TextSettings:
    """How texts become tokens: sentence-transformers' sentence_bert_config.json and
    config_sentence_transformers.json."""

    max_length: int  # tokens per text, special tokens included
    lowercase: bool
    prompt: str  # put before every text (the config's default prompt), "" for none
    pad_id: int


def text_settings(model_dir: Path, manifest: Manifest, tokenizer: TextTokenizer) -> TextSettings:
    st = read_json(model_dir / "sentence_bert_config.json")
    longest = manifest.sample.get("max_sequence_length")
    limit = st.get("max_seq_length")
    if limit is None:  # sentence-transformers: the tokenizer's own limit, if it has a real one
        limit = read_json(model_dir / "tokenizer_config.json").get("model_max_length")
        limit = limit if isinstance(limit, int) and limit < 1_000_000 else None
    limits = [x for x in (limit, longest) if x]
    config = read_json(model_dir / "config_sentence_transformers.json")
    name = config.get("default_prompt_name")
    prompt = (config.get("prompts") or {}).get(name, "") if name else ""
    pad = special_tokens(model_dir).get("pad_token")
    pad_id = tokenizer.token_id(pad) if pad else None
    if pad_id is None:
        pad_id = (tokenizer.backend.padding or {}).get("pad_id", 0)
    max_length = min(limits) if limits else 512  # BERT's, where nothing says
    return TextSettings(int(max_length), bool(st.get("do_lower_case")), prompt, pad_id)


def check_encoder(model_dir: Path, manifest: Manifest) -> None:
    if HIDDEN in {t.name for t in manifest.outputs}:
        return
    what = "a decoder" if manifest.task.startswith("text-generation") else "not an encoder"
    raise InputError(
        f"model '{model_dir}' is {what} ({manifest.task}): embed needs an encoder exported for "
        f"feature-extraction (its output {HIDDEN})"
    )


def embed_texts(
    model_dir: Path,
    manifest: Manifest,
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    texts: Any,
    normalize: bool | None,
    batch_size: int,
) -> np.ndarray:
    """[len(texts), dim] float32 embeddings of `texts` (a list of str, or one str)."""
    check_encoder(model_dir, manifest)
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, (list, tuple)) or not texts:
        raise InputError("embed takes a non-empty list of texts")
    if not all(isinstance(t, str) for t in texts):
        raise InputError("embed takes texts (str); give every item as a str")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    pooling = read_pooling(model_dir)
    if pooling.declared_by is None:
        warnings.warn(
            f"'{model_dir}' declares no pooling (no sentence-transformers modules.json): mean "
            f"pooling over the attention mask",
            PoolingNotDeclared,
            stacklevel=3,
        )
    if normalize is not None:
        pooling = replace(pooling, normalize=bool(normalize))
    tokenizer = load_tokenizer(model_dir)
    s = text_settings(model_dir, manifest, tokenizer)
    if s.lowercase:
        texts = [t.lower() for t in texts]
    skip = 0  # positions of the prompt that pooling leaves out
    if s.prompt:
        texts = [s.prompt + t for t in texts]
        if not pooling.include_prompt:
            skip = len(tokenizer.encode(s.prompt)) - 1  # [CLS] + the prompt, as ST counts it
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # less padding per batch
    out: list[np.ndarray | None] = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        encoded = tokenizer.encode_batch([texts[i] for i in rows], s.max_length, s.pad_id)
        hidden = run(_feeds(manifest, encoded))[HIDDEN]  # (B, T, H)
        mask = encoded["attention_mask"].copy()
        mask[:, :skip] = 0
        for i, vector in zip(rows, pool(hidden, mask, pooling), strict=True):
            out[i] = vector
    return np.stack(out)


def _feeds(manifest: Manifest, encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's inputs from the tokenizer's arrays (position ids counted from 0)."""
    feeds = {}
    for spec in manifest.inputs:
        if spec.name in encoded:
            feeds[spec.name] = encoded[spec.name]
        elif spec.name == "position_ids":
            ids = encoded["input_ids"]
            feeds[spec.name] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        else:
            raise InputError(f"the model takes '{spec.name}', which embed cannot make from text")
    return feeds
