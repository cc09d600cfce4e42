"""tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json
built from a GGUF's `tokenizer.ggml.*` fields with `tokenizers`.

Not transformers' own GGUF tokenizer: for SmolLM2 it takes <|im_start|> as EOS, prepends a BOS
the file says not to add (a chat prompt then starts with two), ignores the pre-tokenizer and, saved,
copies the whole GGUF as `tokenizer.model`. Byte-level BPE (`tokenizer.ggml.model` "gpt2") with
the pre-tokenizers of PRE_TOKENIZERS; other tokenizers are left out with a message (the model
then takes token ids)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hermes_ort.export.gguf.reader import GGUFFile
from hermes_ort.export.logs import say

# gguf-py's TokenType: 3 control (special), 4 user defined
CONTROL, USER_DEFINED = 3, 4
# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), as the Hugging Face tokenizers of the
# same models split; then byte-level
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = ("gpt-2", "smollm", "starcoder", "llama-bpe", "qwen2")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "gpt-2":
        return byte_level
    if pre in ("smollm", "starcoder"):  # "\p{N}" then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    regex = _LLAMA3 if pre == "llama-bpe" else _QWEN2
    split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
    raw_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return pre_tokenizers.Sequence([split, raw_bytes])


def tokenizer_problem(f: GGUFFile) -> str | None:
    """Why the file's tokenizer cannot be built (None: it can)."""
    model, pre = f.field("tokenizer.ggml.model"), f.field("tokenizer.ggml.pre", "gpt-2")
    if model is None:
        return "the GGUF file has no tokenizer"
    if model != "gpt2":
        return f"tokenizer.ggml.model '{model}' is not supported (byte-level BPE 'gpt2' is)"
    if pre not in PRE_TOKENIZERS:
        return f"tokenizer.ggml.pre '{pre}' is not supported ({', '.join(PRE_TOKENIZERS)} are)"
    return None


def write_tokenizer_files(f: GGUFFile, out: Path) -> list[str]:
    """The tokenizer files of `f` into `out` (the names written; none when unsupported)."""
    problem = tokenizer_problem(f)
    if problem is not None:
        say(f"{problem}: the model takes token ids only")
        return []
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    tokens = list(f.field("tokenizer.ggml.tokens"))
    types = list(f.field("tokenizer.ggml.token_type") or [])
    merges = [tuple(m.split(" ", 1)) for m in f.field("tokenizer.ggml.merges") or []]
    bpe = BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    pre = f.field("tokenizer.ggml.pre", "gpt-2")
    if pre == "qwen2":  # Qwen2's own tokenizer.json normalizes to NFC first
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(f, tokens, processors)
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in _of(types, CONTROL)]
    )
    tok.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i in _of(types, USER_DEFINED)]
    )
    tok.save(str(out / "tokenizer.json"))
    config = tokenizer_config(f, tokens)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return ["tokenizer.json", "tokenizer_config.json"]


def _of(types: list[int], kind: int) -> list[int]:
    return [i for i, t in enumerate(types) if t == kind]


def _post_processor(f: GGUFFile, tokens: list[str], processors):
    """Nothing added unless the file says so (`add_bos_token`): then its BOS in front."""
    bos = f.field("tokenizer.ggml.bos_token_id")
    if f.field("tokenizer.ggml.add_bos_token", False) and bos is not None:
        b = tokens[int(bos)]
        return processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, int(bos))]
                ),
            ]
        )
    return processors.ByteLevel(trim_offsets=False)


def special_ids(f: GGUFFile) -> dict[str, int]:
    """bos/eos/pad/unk token ids the file names."""
    ids = {}
    for key, field in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        value = f.field(f"tokenizer.ggml.{field}_token_id")
        if value is not None:
            ids[key] = int(value)
    return ids


def tokenizer_config(f: GGUFFile, tokens: list[str]) -> dict[str, Any]:
    ids = special_ids(f)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key in ("bos", "eos", "pad", "unk"):
        if key in ids:
            config[f"{key}_token"] = tokens[ids[key]]
    config.update(
        add_bos_token=bool(f.field("tokenizer.ggml.add_bos_token", False)),
        add_prefix_space=bool(f.field("tokenizer.ggml.add_space_prefix", False)),
        clean_up_tokenization_spaces=False,
        model_max_length=int(f.arch_field("context_length")),
    )
    template = f.field("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    return config


def generation_config(f: GGUFFile) -> dict[str, int]:
    """generation_config.json's token ids: bos, eos, pad."""
    ids = special_ids(f)
    return {f"{k}_token_id": ids[k] for k in ("bos", "eos", "pad") if k in ids}
