"""A fused ONNX graph for Llama-family decoders (llama, mistral, qwen2), built from the weights:
the contrib ops ONNX Runtime runs fastest on CPU, where optimum's export is dozens of small ops a
layer (docs/design.md §2.6):

    prologue  Gather(embed_tokens, input_ids); from attention_mask: seqlens_k, total_seq_len
    layer i   SimplifiedLayerNormalization (i = 0) or SkipSimplifiedLayerNormalization (the last
              layer's residual + MLP output), one packed QKV MatMul (+ bias, qwen2),
              GroupQueryAttention (rotary inside, the layer's KV cache in and out), the output
              MatMul, SkipSimplifiedLayerNormalization, gate and up MatMuls, SiLU, down MatMul
    epilogue  SkipSimplifiedLayerNormalization, the LM head MatMul (tied: FusedMatMul, transB,
              of the embedding table itself)

Node names carry the layer (`/model/layers.<i>/...`), so the regular cutter cuts it into blocks;
every MatMul weight is an initializer [in, out] (W^T), so weight-only quantization (quantize.py)
applies as it does to any block. The same functions build one layer alone, from a checkpoint's
tensors, for the streaming export.

Given `packed` (a GGUF's own blocks, gguf/), a weight it returns is emitted as it is held:
MatMulNBits (+ its offset term, nbits.py), the embedding as GatherBlockQuantized of the same
bytes as a tied head's MatMulNBits; q/k/v of different bits or block sizes as three projections
instead of the packed QKV."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hermes_ort.export.errors import ExportError
from hermes_ort.export.nbits import NBitsWeight, gather_block_quantized, matmul_nbits, stack_rows

FAMILIES = ("llama", "mistral", "qwen2")
MS = "com.microsoft"


@dataclass(frozen=True)
class Shape:
    family: str
    vocab: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    eps: float
    theta: float
    max_positions: int
    qkv_bias: bool
    tied: bool
    rope: dict[str, Any] | None  # rope_scaling (llama3's) or None

    @classmethod
    def of(cls, config: dict[str, Any]) -> Shape:
        family = config.get("model_type")
        if family not in FAMILIES:
            raise ExportError(f"the fused graph is for {', '.join(FAMILIES)}, not '{family}'")
        rope = config.get("rope_scaling")
        if rope and rope.get("rope_type", rope.get("type")) not in ("default", "llama3"):
            raise ExportError(f"rope_scaling {rope} is not supported by the fused graph")
        if config.get("hidden_act", "silu") != "silu":
            raise ExportError(f"hidden_act '{config['hidden_act']}': the fused graph is SiLU's")
        heads = config["num_attention_heads"]
        return cls(
            family=family,
            vocab=config["vocab_size"],
            hidden=config["hidden_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            eps=config.get("rms_norm_eps", 1e-6),
            theta=config.get("rope_theta", 10000.0),
            max_positions=config["max_position_embeddings"],
            qkv_bias=family == "qwen2" or bool(config.get("attention_bias")),
            tied=bool(config.get("tie_word_embeddings")),
            rope=rope if rope and rope.get("rope_type", rope.get("type")) == "llama3" else None,
        )


def rotary_caches(shape: Shape) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_positions, head_dim / 2], non-interleaved (HF's rotate_half)."""
    dim = shape.head_dim
    inv_freq = 1.0 / (
        shape.theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim)
    )
    if shape.rope:  # llama3: long wavelengths slowed down, short ones kept, smooth between
        r = shape.rope
        factor, low, high = r["factor"], r["low_freq_factor"], r["high_freq_factor"]
        original = r["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
        middle = (wavelen <= original / low) & (wavelen >= original / high)
        inv_freq = np.where(middle, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    freqs = np.outer(np.arange(shape.max_positions, dtype=np.float64), inv_freq)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


class Graph:
    """Nodes, initializers and the value infos of one graph under construction."""

    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: list = []
        self.initializers: list = []
        self.names: set[str] = set()

    def node(
        self, op: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "", **attrs
    ):
        outs = [f"{name}/output_{k}" for k in range(outputs)]
        self.nodes.append(
            self.helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs)
        )
        return outs if outputs > 1 else outs[0]

    def add(self, made: tuple[list, list]) -> None:
        """Nodes and initializers from nbits.py; an initializer already here is not added again
        (a tied table's gather and MatMul name the same one)."""
        nodes, initializers = made
        self.nodes.extend(nodes)
        for t in initializers:
            if t.name not in self.names:
                self.names.add(t.name)
                self.initializers.append(t)

    def weight(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self.names:
            self.names.add(name)
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name


Tensors = Callable[[str], np.ndarray]  # a checkpoint tensor by its name, as float32
Packed = Callable[[str], NBitsWeight | None]  # a weight as MatMulNBits holds it, or None: float


def _unpacked(name: str) -> None:
    return None


def _linear(g: Graph, x: str, tensors: Tensors, key: str, name: str, packed: Packed) -> str:
    return _project(g, x, packed(f"{key}.weight"), tensors, key, name)


def _project(g: Graph, x: str, w: NBitsWeight | None, tensors: Tensors, key: str, name: str):
    """x @ W^T: MatMul of W^T [in, out], or MatMulNBits of `w`, W's blocks (`name` ends in
    MatMul)."""
    if w is not None:
        name = name.removesuffix("MatMul") + "MatMulNBits"
        out = f"{name}/output"
        g.add(matmul_nbits(x, w, out, name, weight=f"{key}.weight"))
        return out
    w = g.weight(f"{key}.weight.T", tensors(f"{key}.weight").T)
    return g.node("MatMul", [x, w], name)


def _qkv(g: Graph, shape: Shape, x: str, tensors: Tensors, a: str, p: str, packed: Packed):
    """GroupQueryAttention's query, key, value inputs: one packed projection (q, k, v rows
    stacked) and two "", or three projections when their weights cannot stack."""
    ws = [packed(f"{a}.{x}_proj.weight") for x in "qkv"]
    forms = {None if w is None else (w.bits, w.block_size) for w in ws}
    if len(forms) > 1:  # float and packed, or packed of different forms: apart
        outs = []
        for x_, w in zip("qkv", ws, strict=True):
            out = _project(g, x, w, tensors, f"{a}.{x_}_proj", f"{p}/attn/{x_}_proj/MatMul")
            if shape.qkv_bias:
                bias = g.weight(f"{a}.{x_}_proj.bias", tensors(f"{a}.{x_}_proj.bias"))
                out = g.node("Add", [out, bias], f"{p}/attn/{x_}_proj/Add")
            outs.append(out)
        return outs
    if ws[0] is not None:
        name = f"{p}/attn/qkv_proj/MatMulNBits"
        qkv = f"{name}/output"
        g.add(matmul_nbits(x, stack_rows(ws), qkv, name, weight=f"{a}.qkv_proj.weight"))
    else:
        qkv_w = np.concatenate([tensors(f"{a}.{x_}_proj.weight").T for x_ in "qkv"], axis=1)
        qkv = g.node(
            "MatMul", [x, g.weight(f"{a}.qkv_proj.weight.T", qkv_w)], f"{p}/attn/qkv_proj/MatMul"
        )
    if shape.qkv_bias:
        bias = np.concatenate([tensors(f"{a}.{x_}_proj.bias") for x_ in "qkv"])
        qkv = g.node("Add", [qkv, g.weight(f"{a}.qkv_proj.bias", bias)], f"{p}/attn/qkv_proj/Add")
    return [qkv, "", ""]


def _skip_norm(g: Graph, x: str, residual: str, weight: str, name: str, eps: float):
    """SkipSimplifiedLayerNormalization: (RMSNorm(x + residual), x + residual)."""
    outs = g.node(
        "SkipSimplifiedLayerNormalization",
        [x, residual, weight],
        name,
        outputs=4,
        domain=MS,
        epsilon=eps,
    )
    return outs[0], outs[3]


def prologue_nodes(
    g: Graph, shape: Shape, tensors: Tensors, packed: Packed = _unpacked
) -> tuple[str, str, str]:
    """(hidden states, seqlens_k, total_seq_len) from input_ids and attention_mask."""
    one = g.weight("/model/constants/one", np.array([1], np.int64))
    base = "/model/attn_mask_reformat"
    total = g.node("ReduceSum", ["attention_mask", one], f"{base}/ReduceSum", keepdims=0)
    seqlens = g.node("Sub", [total, one], f"{base}/Sub")
    seqlens = g.node("Cast", [seqlens], f"{base}/Sub/Cast", to=6)  # int32 [batch]
    width = g.node("Shape", ["attention_mask"], f"{base}/Shape")
    width = g.node(
        "Gather",
        [width, g.weight("/model/constants/index1", np.array(1, np.int64))],
        f"{base}/Gather",
        axis=0,
    )
    width = g.node("Cast", [width], f"{base}/Gather/Cast", to=6)  # int32 scalar
    table = "model.embed_tokens.weight"
    w = packed(table)
    if w is not None:
        name = "/model/embed_tokens/GatherBlockQuantized"
        g.add(gather_block_quantized("input_ids", w, f"{name}/output", name, weight=table))
        return f"{name}/output", seqlens, width
    embed = g.weight(table, tensors(table))
    hidden = g.node("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather")
    return hidden, seqlens, width


def layer_nodes(
    g: Graph,
    shape: Shape,
    i: int,
    tensors: Tensors,
    inputs: tuple[str, ...],
    seqlens: str,
    width: str,
    packed: Packed = _unpacked,
) -> tuple[str, str]:
    """Layer i: from (hidden) or (residual, MLP output) of the layer before, to (residual, MLP
    output); its KV cache is past_key_values.i.key/value in, present.i.key/value out."""
    p, key = f"/model/layers.{i}", f"model.layers.{i}"
    w_in = g.weight(f"{key}.input_layernorm.weight", tensors(f"{key}.input_layernorm.weight"))
    if len(inputs) == 1:
        normed = g.node(
            "SimplifiedLayerNormalization",
            [inputs[0], w_in],
            f"{p}/input_layernorm/LayerNorm",
            axis=-1,
            epsilon=shape.eps,
            stash_type=1,
        )
        residual = inputs[0]
    else:
        name = f"{p}/input_layernorm/SkipLayerNorm"
        normed, residual = _skip_norm(g, inputs[1], inputs[0], w_in, name, shape.eps)
    a = f"{key}.self_attn"
    query_key_value = _qkv(g, shape, normed, tensors, a, p, packed)
    cos, sin = rotary_caches(shape)
    attn = g.node(
        "GroupQueryAttention",
        [
            *query_key_value,
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            seqlens,
            width,
            g.weight("/model/rotary/cos_cache", cos),
            g.weight("/model/rotary/sin_cache", sin),
        ],
        f"{p}/attn/GroupQueryAttention",
        outputs=3,
        domain=MS,
        num_heads=shape.heads,
        kv_num_heads=shape.kv_heads,
        do_rotary=1,
        rotary_interleaved=0,
        scale=1.0 / math.sqrt(shape.head_dim),
    )
    g.nodes.append(
        g.helper.make_node(
            "Identity", [attn[1]], [f"present.{i}.key"], name=f"{p}/attn/present_key"
        )
    )
    g.nodes.append(
        g.helper.make_node(
            "Identity", [attn[2]], [f"present.{i}.value"], name=f"{p}/attn/present_value"
        )
    )
    out = _linear(g, attn[0], tensors, f"{a}.o_proj", f"{p}/attn/o_proj/MatMul", packed)
    w_post = g.weight(
        f"{key}.post_attention_layernorm.weight", tensors(f"{key}.post_attention_layernorm.weight")
    )
    name = f"{p}/post_attention_layernorm/SkipLayerNorm"
    normed, residual = _skip_norm(g, out, residual, w_post, name, shape.eps)
    m = f"{key}.mlp"
    gate = _linear(g, normed, tensors, f"{m}.gate_proj", f"{p}/mlp/gate_proj/MatMul", packed)
    up = _linear(g, normed, tensors, f"{m}.up_proj", f"{p}/mlp/up_proj/MatMul", packed)
    silu = g.node(
        "Mul", [gate, g.node("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")], f"{p}/mlp/act_fn/Mul"
    )
    act = g.node("Mul", [silu, up], f"{p}/mlp/Mul")
    mlp = _linear(g, act, tensors, f"{m}.down_proj", f"{p}/mlp/down_proj/MatMul", packed)
    return residual, mlp


def epilogue_nodes(
    g: Graph,
    shape: Shape,
    tensors: Tensors,
    residual: str,
    mlp: str,
    packed: Packed = _unpacked,
) -> None:
    """The final norm and the LM head. A tied head reads the embedding table in place (the
    blocks share its bytes; quantized, quant_graph.py makes the table one MatMulNBits form
    that the lookup reads too). A packed head is MatMulNBits (tied: of the embedding's own
    initializers)."""
    w = g.weight("model.norm.weight", tensors("model.norm.weight"))
    normed, _ = _skip_norm(g, mlp, residual, w, "/model/norm/SkipLayerNorm", shape.eps)
    head = "model.embed_tokens.weight" if shape.tied else "lm_head.weight"
    w_packed = packed(head)
    if w_packed is not None:
        g.add(matmul_nbits(normed, w_packed, "logits", "/lm_head/MatMulNBits", weight=head))
        return
    if shape.tied:  # the embedding table itself, [vocab, hidden]: stored once
        table = g.weight("model.embed_tokens.weight", tensors("model.embed_tokens.weight"))
        g.nodes.append(
            g.helper.make_node(
                "FusedMatMul",
                [normed, table],
                ["logits"],
                name="/lm_head/FusedMatMul",
                domain=MS,
                transB=1,
            )
        )
        return
    w_head = g.weight("lm_head.weight.T", tensors(head).T)
    g.nodes.append(
        g.helper.make_node("MatMul", [normed, w_head], ["logits"], name="/lm_head/MatMul")
    )


def _cache_value(shape: Shape, name: str, past: bool):
    from onnx import TensorProto, helper

    length = "past_sequence_length" if past else "total_sequence_length"
    dims = ["batch_size", shape.kv_heads, length, shape.head_dim]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def whole_model(
    shape: Shape,
    tensors: Tensors,
    opset: int = 17,
    packed: Packed | None = None,
):
    """The whole decoder as one graph (the exporter then cuts, optimises and verifies it);
    `packed`: the weights kept in their MatMulNBits form (opset >= 15 for their offset terms)."""
    from onnx import TensorProto, helper

    packed = packed or _unpacked
    g = Graph()
    hidden, seqlens, width = prologue_nodes(g, shape, tensors, packed)
    carried: tuple[str, ...] = (hidden,)
    boundary = [hidden]  # what crosses blocks: ONNX's shape inference skips the contrib ops
    for i in range(shape.layers):
        carried = layer_nodes(g, shape, i, tensors, carried, seqlens, width, packed)
        boundary += carried
    epilogue_nodes(g, shape, tensors, *carried, packed=packed)
    inputs = [
        helper.make_tensor_value_info(
            "input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
        ),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        ),
    ]
    outputs = [
        helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch_size", "sequence_length", shape.vocab]
        )
    ]
    for i in range(shape.layers):
        inputs += [
            _cache_value(shape, f"past_key_values.{i}.{kv}", True) for kv in ("key", "value")
        ]
        outputs += [_cache_value(shape, f"present.{i}.{kv}", False) for kv in ("key", "value")]
    states = ["batch_size", "sequence_length", shape.hidden]
    types = [helper.make_tensor_value_info(x, TensorProto.FLOAT, states) for x in boundary]
    types += [
        helper.make_tensor_value_info(seqlens, TensorProto.INT32, ["batch_size"]),
        helper.make_tensor_value_info(width, TensorProto.INT32, None),  # GQA: [] or [1]
    ]
    graph = helper.make_graph(g.nodes, "fused", inputs, outputs, g.initializers, value_info=types)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="hermes-ort fused")


def torch_tensors(model) -> Tensors:
    """The tensors of a torch model (the exporter's template or preset), as float32 numpy."""
    state = model.state_dict()

    def get(name: str) -> np.ndarray:
        return state[name].detach().float().numpy()

    return get
