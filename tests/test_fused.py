"""The fused graph (hermes_ort/export/fused.py) of Llama-family decoders: the same model as
transformers' (greedy tokens equal, logits within 1e-4 on the prompt), cut into blocks like any
other graph, and streamed layer by layer from a checkpoint (with int4 weights, equal to the regular
int4 export)."""

from __future__ import annotations

import numpy as np
import pytest

try:
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

import hermes_ort

pytest.importorskip("torch", reason="exporting needs torch (not on the aarch64 board)")

PROMPT = [5, 17, 99, 3, 42, 7, 250, 11]


def _hf(model, prompt, n):
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0].numpy()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral", "tiny-qwen2"])
def test_the_fused_graph_generates_transformers_tokens(tmp_path, preset):
    assert fx.export_cli(tmp_path / "m", "--preset", preset, "--graph", "fused") == 0
    manifest = hermes_ort.load_manifest(tmp_path / "m")
    assert manifest.verification["max_abs_diff"] <= 1e-4  # the prompt pass against PyTorch
    want = _hf(fx.preset_model(preset), PROMPT, 16)
    for kwargs in ({}, {"memory_budget": "min"}):
        with hermes_ort.load(tmp_path / "m", **kwargs) as model:
            np.testing.assert_array_equal(model.generate(PROMPT, 16, eos_token_id=[]), want)


def test_a_tied_head_reads_the_embedding_in_place(tmp_path):
    """qwen2's tied head is a FusedMatMul (transB) of the embedding table itself: one copy."""
    assert fx.export_cli(tmp_path / "m", "--preset", "tiny-qwen2", "--graph", "fused") == 0
    manifest = hermes_ort.load_manifest(tmp_path / "m")
    pro, epi = manifest.blocks[0], manifest.blocks[-1]
    shared = {f.path for f in pro.files} & {f.path for f in epi.files}
    assert any(p.endswith("shared.data") for p in shared)


def test_a_fused_int4_checkpoint_streams_layer_by_layer(tmp_path):
    model = fx.noisy_llama(
        vocab_size=500,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model.save_pretrained(tmp_path / "ckpt")
    args = ["--model", str(tmp_path / "ckpt"), "--quantize", "int4", "--quant-block-size", "16"]
    # random weights: six int4 layers bring the logits' cosine to ~0.98 (a trained model's stay
    # above 0.99); what this test pins is streamed == regular, exactly
    args += ["--accuracy-floor", "0.95"]
    assert fx.export_cli(tmp_path / "regular", *args) == 0
    assert fx.export_cli(tmp_path / "streamed", *args, "--streaming") == 0
    streamed = hermes_ort.load_manifest(tmp_path / "streamed")
    assert [b.layers for b in streamed.blocks if b.kind == "layers"] == [(i,) for i in range(6)]
    assert streamed.quantization["mode"] == "int4" and streamed.full_model is None
    with hermes_ort.load(tmp_path / "regular") as a, hermes_ort.load(tmp_path / "streamed") as b:
        feeds = a.sample_inputs(sequence_length=9, seed=3)
        want, got = a.run(feeds), b.run(feeds)
        np.testing.assert_array_equal(
            a.generate(PROMPT, 8, eos_token_id=[]), b.generate(PROMPT, 8, eos_token_id=[])
        )
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0)


def test_streaming_a_quantized_model_needs_the_fused_graph(tmp_path, capsys):
    fx.save_tiny_gpt2(tmp_path / "ckpt", n_layer=5)
    args = ["--model", str(tmp_path / "ckpt"), "--streaming", "--quantize", "int4"]
    assert fx.export_cli(tmp_path / "m", *args) == 1
    assert (
        "--streaming --quantize builds its layers with the fused graph" in capsys.readouterr().err
    )
