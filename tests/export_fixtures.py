"""Helpers for the exporter tests: tiny models rebuilt independently of the exporter, sample inputs,
and a plain onnxruntime chain over a manifest's blocks (no hermes_ort runtime involved)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

PRESETS_DIR = Path(__file__).resolve().parents[1] / "hermes_ort" / "presets"
SEQ_LEN = 16  # the exports' verification length; the tests run other shapes on purpose


def export_cli(out: Path, *args: str, full_model: bool = True) -> int:
    """`hermes-ort export ... --out OUT`, quietly, at SEQ_LEN; with the whole-model files the
    `full` baselines open unless `full_model` is False (the exporter's default)."""
    from hermes_ort.export import cli

    extra = ["--full-model"] if full_model else []
    return cli.main([*args, "--out", str(out), "--seq-len", str(SEQ_LEN), "--quiet", *extra])


def preset_model(name: str, seed: int = 0):
    """The documented preset recipe: default init under torch.manual_seed(seed), then N(0, 0.02)
    added to every parameter."""
    import torch
    import transformers

    data = json.loads((PRESETS_DIR / f"{name}.json").read_text())
    config = getattr(transformers, data["config_class"])(**data["config"])
    torch.manual_seed(seed)
    model = getattr(transformers, data["model_class"])(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    return model.eval()


def noisy_llama(seed: int = 0, **config):
    """A Llama-style model of `config` built like a preset: seeded init plus N(0, 0.02) noise."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    return model.eval()


def save_tiny_gpt2(path: Path, n_layer: int = 4):
    """A 4-layer GPT-2 whose tied embedding (600 x 32 floats) is big enough to be shared."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=600, n_positions=64)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(path)
    return model.eval()


def sample_inputs(
    names, config, batch: int = 2, seq: int = 11, seed: int = 1
) -> dict[str, np.ndarray]:
    """Inputs of another shape than the export's, with padding in the attention mask."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name in names:
        if name == "input_ids":
            feed[name] = rng.integers(0, config.vocab_size, (batch, seq), dtype=np.int64)
        elif name == "attention_mask":
            mask = np.ones((batch, seq), np.int64)
            mask[-1, -3:] = 0  # right padding in the last row
            feed[name] = mask
        elif name == "token_type_ids":
            feed[name] = rng.integers(0, 2, (batch, seq), dtype=np.int64)
        elif name == "position_ids":
            feed[name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        elif name == "pixel_values":
            size = config.image_size
            feed[name] = rng.standard_normal((batch, config.num_channels, size, size)).astype(
                np.float32
            )
        elif name.startswith("past_key_values."):  # the prompt pass: an empty cache
            heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim = config.hidden_size // config.num_attention_heads
            feed[name] = np.zeros((batch, heads, 0, head_dim), np.float32)
        else:
            raise AssertionError(f"unexpected input {name}")
    return feed


def torch_run(model, feed: dict[str, np.ndarray], names) -> dict[str, np.ndarray]:
    import torch

    kwargs = {k: torch.from_numpy(v) for k, v in feed.items() if not k.startswith("past_")}
    with torch.no_grad():
        out = model(**kwargs)
    return {n: _torch_output(out, n).numpy() for n in names}


def _torch_output(out, name: str):
    """`present.i.key/value`: layer i of the returned cache (the prompt's keys/values)."""
    if not name.startswith("present."):
        return out[name]
    _, layer, kind = name.split(".")
    key, value = out["past_key_values"][int(layer)][:2]
    return key if kind == "key" else value


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def chain_blocks(model_dir: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run manifest.json's blocks in order with plain onnxruntime, routing tensors by name."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    env = dict(feed)
    for block in manifest["blocks"]:
        session = ort_session(model_dir / block["path"])
        assert [i.name for i in session.get_inputs()] == block["inputs"]
        assert [o.name for o in session.get_outputs()] == block["outputs"]
        values = session.run(block["outputs"], {n: env[n] for n in block["inputs"]})
        env.update(zip(block["outputs"], values, strict=True))
    return {o["name"]: env[o["name"]] for o in manifest["outputs"]}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(parent: Path) -> list[str]:
    """Names in `parent` an export may leave behind by mistake (temp or swapped-out directories)."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)
