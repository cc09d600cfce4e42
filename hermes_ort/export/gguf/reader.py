"""A GGUF file opened and checked (numpy only, before torch is imported): its metadata, its
tensors' bytes (memory-mapped by gguf-py) and the transformers config its metadata describes."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes_ort.export.errors import ExportError

# gguf-py's MODEL_ARCH names this exporter reads -> transformers' model type and class; each a
# family of the fused graph (fused.FAMILIES). Mistral's GGUFs say "llama".
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUFFIX = ".gguf"


class _TruncatedError(ValueError):
    def __init__(self, tensor: str, end: int, size: int):
        super().__init__(tensor)
        self.tensor, self.end, self.size = tensor, end, size


def _checked_reader():
    """gguf-py's reader, made to check that every tensor's data lies inside the file (it would
    reshape a short memory map and fail without the tensor's name)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class Reader(GGUFReader):
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            size = len(self.data)
            for field in fields:
                _, name, _, dims, raw_type, offset = field.parts
                block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
                end = start_offs + int(offset[0]) + int(np.prod(dims)) * type_bytes // block
                if end > size:
                    raise _TruncatedError(bytes(name).decode(errors="replace"), end, size)
            super()._build_tensors(start_offs, fields)

    return Reader


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    reader: Any  # gguf.GGUFReader: fields, tensors (data memory-mapped)

    @property
    def architecture(self) -> str:
        return self.field("general.architecture")

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def arch_field(self, key: str, default: Any = None) -> Any:
        """`<architecture>.<key>`, e.g. `llama.block_count`."""
        return self.field(f"{self.architecture}.{key}", default)

    def tensors(self) -> dict[str, Any]:
        """GGUF name -> gguf-py's ReaderTensor (`tensor_type`, `shape` in ggml order, `data`)."""
        return {t.name: t for t in self.reader.tensors}


def find_gguf(ref: str) -> Path | None:
    """The GGUF file `ref` names: a .gguf file, or a directory with no config.json holding
    exactly one (ExportError when it holds several). None: not a GGUF source."""
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix.lower() == SUFFIX:
        return path.resolve()
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ExportError(f"'{ref}' holds {len(found)} GGUF files ({names}): give one as --model")
    return found[0].resolve() if found else None


def open_gguf(path: Path) -> GGUFFile:
    """The file read and checked: whole (every tensor's data inside it), one file (not a split),
    of a supported architecture; else ExportError naming the file (and tensor)."""
    stat = path.stat()
    return _open(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)  # checked before the export, read again by it: parsed once
def _open(path: Path, size: int, mtime_ns: int) -> GGUFFile:
    try:
        reader = _checked_reader()(str(path))
    except _TruncatedError as e:
        raise ExportError(
            f"GGUF file '{path}' is truncated or damaged: tensor '{e.tensor}' runs past the end "
            f"of the file (its data ends at byte {e.end}, the file has {e.size})"
        ) from None
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise ExportError(f"'{path}' is not a readable GGUF file: {e}") from None
    f = GGUFFile(path, reader)
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise ExportError(
            f"GGUF file '{path}': architecture '{arch}' is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    if (f.field("split.count") or 1) > 1:
        raise ExportError(f"GGUF file '{path}' is one part of a split model: merge it first")
    return f


def config_of(f: GGUFFile) -> dict[str, Any]:
    """The transformers config (as a dict) of the file's metadata, as transformers' own GGUF
    loader maps it, refusing what the fused graph cannot hold."""
    where = f"GGUF file '{f.path}'"
    heads = int(f.arch_field("attention.head_count"))
    hidden = int(f.arch_field("embedding_length"))
    head_dim = int(f.arch_field("attention.key_length") or hidden // heads)
    rotary = f.arch_field("rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise ExportError(f"{where}: partial rotary ({rotary} of {head_dim} dims) is not supported")
    scaling = f.arch_field("rope.scaling.type")
    if scaling not in (None, "none"):
        raise ExportError(f"{where}: rope scaling '{scaling}' is not supported")
    tensors = f.tensors()
    tokens = f.field("tokenizer.ggml.tokens")
    vocab = f.arch_field("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        vocab = int(tensors["token_embd.weight"].shape[1])
    config = {
        "model_type": f.architecture,
        "architectures": [ARCHITECTURES[f.architecture]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(f.arch_field("feed_forward_length")),
        "num_hidden_layers": int(f.arch_field("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(f.arch_field("attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "max_position_embeddings": int(f.arch_field("context_length")),
        "rms_norm_eps": _decimal(f.arch_field("attention.layer_norm_rms_epsilon")),
        "rope_theta": _decimal(f.arch_field("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }
    if f.architecture == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    for key, field in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        value = f.field(f"tokenizer.ggml.{field}_token_id")
        if value is not None:
            config[f"{key}_token_id"] = int(value)
    return config


def _decimal(value: float) -> float:
    """A float32 field as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    import numpy as np

    return float(str(np.float32(value)))
