"""A tiny GGUF written the way llama.cpp's converter writes one (Q/K rows permuted, tensors
quantized by gguf-py, a byte-level BPE tokenizer and a chat template), from a tiny random Llama
whose PyTorch twin the tests keep."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# GGUF tensor -> GGML type of the tiny file: q/k/v of layer 0 in three forms (three projections),
# layer 1's stacked (one packed QKV), an F16 linear, a Q4_1 embedding (offsets in the lookup) and
# an untied Q8_0 head
TYPES = {
    "token_embd.weight": "Q4_1",
    "output.weight": "Q8_0",
    "blk.0.attn_q.weight": "Q4_0",
    "blk.0.attn_k.weight": "Q4_1",
    "blk.0.attn_v.weight": "Q8_0",
    "blk.0.attn_output.weight": "Q8_0",
    "blk.1.attn_q.weight": "Q4_1",
    "blk.1.attn_k.weight": "Q4_1",
    "blk.1.attn_v.weight": "Q4_1",
    "blk.1.attn_output.weight": "F16",
    "blk.0.ffn_gate.weight": "Q4_0",
    "blk.1.ffn_gate.weight": "Q4_0",
    "blk.0.ffn_up.weight": "Q4_1",
    "blk.1.ffn_up.weight": "Q4_1",
    "blk.0.ffn_down.weight": "Q8_0",
    "blk.1.ffn_down.weight": "Q8_0",
}
HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n", "o n", "e r", "Ġ a"]
QK_SCALE = 8.0  # a noisy init's Q/K give near-uniform attention, blind to the Q/K row order
CHAT_TEMPLATE = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokens() -> list[str]:
    """GPT-2's 256 byte symbols (bytes_to_unicode), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def vocabulary() -> tuple[list[str], list[int]]:
    """Tokens (specials, bytes, merged pairs) and their gguf-py types (3 control, 1 normal)."""
    tokens = SPECIALS + byte_tokens() + [m.replace(" ", "") for m in MERGES]
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))


def tiny_decoder(seed: int = 0, arch: str = "llama"):
    """The random decoder the tiny GGUF holds (2 layers, 4 heads, 2 KV heads, K a multiple of 32):
    a Llama, or a Qwen2 (q/k/v biases)."""
    import torch
    import transformers

    config = dict(
        vocab_size=len(vocabulary()[0]),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    names = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    }
    config_class, model_class = (getattr(transformers, n) for n in names[arch])
    torch.manual_seed(seed)
    model = model_class(config_class(**config))
    with torch.no_grad():  # a preset's recipe: init plus N(0, 0.02) noise
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    with torch.no_grad():  # attention that depends on positions: rotary pairs matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(QK_SCALE)
            layer.self_attn.k_proj.weight.mul_(QK_SCALE)
    return model.eval()


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (K's with the KV head count)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def gguf_tensors(model, types: dict[str, str]) -> dict[str, tuple[np.ndarray, str]]:
    """GGUF name -> (float32 array in HF layout, llama.cpp's row order, GGML type)."""
    cfg = model.config
    llama = cfg.model_type == "llama"  # llama.cpp permutes llama's Q/K rows, not qwen2's
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        for g, h in HF.items():
            w = state[f"model.layers.{i}.{h}.weight"]
            if llama and g == "attn_q":
                w = permute(w, cfg.num_attention_heads)
            elif llama and g == "attn_k":
                w = permute(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{g}.weight"] = w
            if f"model.layers.{i}.{h}.bias" in state:
                out[f"blk.{i}.{g}.bias"] = state[f"model.layers.{i}.{h}.bias"]
    return {name: (w, types.get(name, "F32")) for name, w in out.items()}


def write_gguf(path: Path, model, types: dict[str, str] = TYPES, arch: str = "llama") -> Path:
    """`model` as llama.cpp would write it, its tensors quantized to `types` (F32 otherwise)."""
    import gguf

    cfg = model.config
    tokens, token_types = vocabulary()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, (value, kind) in gguf_tensors(model, types).items():
        qtype = gguf.GGMLQuantizationType[kind]
        w.add_tensor(name, gguf.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantized_model(model, types: dict[str, str] = TYPES):
    """`model` with each weight as the GGUF holds it (quantized then dequantized by gguf-py):
    the PyTorch model an as-is export must equal."""
    import copy

    import gguf
    import torch

    twin = copy.deepcopy(model)
    state = twin.state_dict()
    for name, kind in types.items():
        qtype = gguf.GGMLQuantizationType[kind]
        hf = _hf_name(name)
        value = state[hf].detach().float().numpy()
        state[hf].copy_(torch.from_numpy(gguf.dequantize(gguf.quantize(value, qtype), qtype)))
    return twin.eval()


def _hf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output.weight":
        return "lm_head.weight"
    _, i, g, _ = name.split(".")
    return f"model.layers.{i}.{HF[g]}.weight"
