"""A GGUF's tensors under transformers' names, each as float32 (gguf-py's dequantization) or, for
the GGML types MatMulNBits holds exactly, as the NBitsWeight of its own blocks; llama.cpp's
Q/K row permutation undone either way (rows move whole: nothing is requantized)."""

from __future__ import annotations

from typing import Any

import numpy as np

from hermes_ort.export.errors import ExportError
from hermes_ort.export.gguf.ggml import CONVERTERS, to_nbits
from hermes_ort.export.gguf.reader import GGUFFile
from hermes_ort.export.nbits import NBitsWeight

GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER = {  # blk.<i>.<key> -> model.layers.<i>.<value>
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
FLOATS = ("F32", "F16", "BF16")


def hf_name(name: str) -> str | None:
    """transformers' name of a GGUF tensor (None: not one of a Llama-family decoder's)."""
    if name in GLOBAL:
        return GLOBAL[name]
    parts = name.split(".")
    if len(parts) != 4:
        return None
    blk, i, key, kind = parts
    if blk == "blk" and i.isdigit() and key in LAYER and kind in ("weight", "bias"):
        return f"model.layers.{i}.{LAYER[key]}.{kind}"
    return None


def unpermute_index(rows: int, heads: int) -> np.ndarray:
    """HF row i = GGUF row index[i]: llama.cpp's converter interleaves each head's rotate-half
    pairs (i, i + head_dim / 2) as rows (2i, 2i + 1); transformers undoes it
    (LlamaTensorProcessor._reverse_permute_weights) as this does."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(rows)


class GGUFWeights:
    """The tensors of a GGUF file, by transformers name."""

    def __init__(self, f: GGUFFile, config: dict[str, Any]):
        self.file = f
        self.by_name: dict[str, Any] = {}
        for name, tensor in f.tensors().items():
            hf = hf_name(name)
            if hf is None:
                raise ExportError(
                    f"GGUF file '{f.path}': tensor '{name}' is not one of a "
                    f"{f.architecture} decoder's that this exporter maps"
                )
            self.by_name[hf] = tensor
        self._heads: dict[str, int] = {}
        if f.architecture == "llama":  # llama.cpp permutes llama's Q/K rows, not qwen2's
            self._heads = {
                "q_proj": config["num_attention_heads"],
                "k_proj": config["num_key_value_heads"],
            }

    def names(self) -> list[str]:
        return list(self.by_name)

    def kind(self, name: str) -> str:
        """The GGML type of tensor `name`: "Q4_1", "F32", ..."""
        return self._tensor(name).tensor_type.name

    def _tensor(self, name: str):
        if name not in self.by_name:
            raise ExportError(f"GGUF file '{self.file.path}' has no tensor for '{name}'")
        return self.by_name[name]

    def _rows(self, name: str, rows: int) -> np.ndarray | None:
        proj = name.split(".")[-2]
        if proj not in self._heads:
            return None
        return unpermute_index(rows, self._heads[proj])

    def float32(self, name: str) -> np.ndarray:
        """Dequantized by gguf-py, HF layout ([out, in] for a Linear), rows un-permuted."""
        from gguf import dequantize

        t = self._tensor(name)
        value = np.array(dequantize(t.data, t.tensor_type), np.float32)  # a copy, not the map
        value = value.reshape(tuple(int(d) for d in reversed(t.shape)))
        index = self._rows(name, value.shape[0])
        return value if index is None else value[index]

    def packed(self, name: str) -> NBitsWeight | None:
        """The 2-D tensor `name` as MatMulNBits holds its GGML blocks exactly (rows
        un-permuted), or None when its type has no exact form (floats, Q2_K, IQ*, ...)."""
        t = self._tensor(name)
        kind = t.tensor_type.name
        if kind not in CONVERTERS or len(t.shape) != 2:
            return None
        k, n = (int(d) for d in t.shape)  # ggml order: ne0 = K (inputs), ne1 = N (outputs)
        w = to_nbits(kind, t.data, n, k)
        index = self._rows(name, n)
        return w if index is None else w.rows(index)

    def packed_form(self, name: str) -> str | None:
        """What `packed(name)` holds, e.g. "8-bit block 32" (None: it is float)."""
        t = self._tensor(name)
        if t.tensor_type.name not in CONVERTERS or len(t.shape) != 2:
            return None
        return CONVERTERS[t.tensor_type.name][1].removeprefix("MatMulNBits ")

    def kept(self) -> dict[str, str]:
        """Per GGML type in the file, what the as-is export makes of it."""
        out: dict[str, str] = {}
        for t in self.by_name.values():
            kind = t.tensor_type.name
            if kind in CONVERTERS and len(t.shape) == 2:
                out[kind] = CONVERTERS[kind][1]
            elif kind == "F32":
                out[kind] = "float32"
            elif kind in FLOATS:
                out[kind] = f"float32 (from {kind})"
            else:
                out[kind] = "float32 (dequantized: no exact MatMulNBits form)"
        return dict(sorted(out.items()))
