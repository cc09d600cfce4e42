"""Quantized exports end to end: every architecture that exports in fp32 exports quantized too
(every tiny preset, the optimum graph of a Llama, and families whose RMSNorm is a ReduceMean
with an `axes` attribute, which ONNX Runtime's quantizer broke by moving the opset to 21); the
blocks hold exactly what `fake_quantize_model` gives PyTorch; a tied table is stored once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="exporting needs torch (not on the aarch64 board)")

import onnx  # noqa: E402

try:
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

import hermes_ort  # noqa: E402
from hermes_ort.export import verify  # noqa: E402
from hermes_ort.export.quantize import Quantization, fake_quantize_model  # noqa: E402

TINY_PRESETS = sorted(p.stem for p in fx.PRESETS_DIR.glob("tiny-*.json"))
SMALL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
SMALL.update(num_attention_heads=4, max_position_embeddings=128)
FAMILIES = {  # config class, model class, extra config: RMSNorm as ReduceMean (gemma, phi3)
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 2, "head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_key_value_heads": 2, "pad_token_id": 0}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),  # an LM head with a bias
}


def _save(path: Path, config_class: str, model_class: str, **config) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    model.save_pretrained(path)
    return path


def _runs(model_dir: Path) -> None:
    """The streamed blocks run and give finite outputs of the manifest's shapes."""
    with hermes_ort.load(model_dir, memory_budget="min") as model:
        outputs = model.run(model.sample_inputs(batch_size=1, sequence_length=9, seed=2))
    assert all(np.isfinite(v).all() for v in outputs.values())


def _checked(model_dir: Path, mode: str) -> None:
    m = hermes_ort.load_manifest(model_dir)
    assert m.quantization["mode"] == mode and m.quantization["method"] == "nbits"
    v = m.verification  # against PyTorch holding the same dequantized weights
    assert v["same_weights"]["cosine"] >= v["same_weights_cosine_floor"]
    _runs(model_dir)


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_every_tiny_preset_exports_quantized(tmp_path, preset, mode):
    """MatMulNBits for every architecture (encoders' int8 default, dynamic, is
    test_quantize.py's: it has no PyTorch twin)."""
    out = tmp_path / "m"
    args = ["--preset", preset, "--quantize", mode, "--quant-method", "nbits"]
    assert fx.export_cli(out, *args, full_model=False) == 0
    _checked(out, mode)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_the_optimum_graph_of_a_llama_exports_quantized(tmp_path, mode):
    args = ["--preset", "tiny-llama", "--quantize", mode, "--graph", "optimum"]
    assert fx.export_cli(tmp_path / "m", *args, full_model=False) == 0
    _checked(tmp_path / "m", mode)


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_other_families_export_quantized_at_their_own_opset(tmp_path, family, mode):
    config_class, model_class, extra = FAMILIES[family]
    ckpt = _save(tmp_path / "ckpt", config_class, model_class, **SMALL, **extra)
    out = tmp_path / "m"
    assert fx.export_cli(out, "--model", str(ckpt), "--quantize", mode, full_model=False) == 0
    _checked(out, mode)
    for b in hermes_ort.load_manifest(out).blocks:  # the export's opset, not 21
        opsets = {o.domain: o.version for o in onnx.load(str(out / b.path)).opset_import}
        assert opsets.get("", opsets.get("ai.onnx")) == 17


@pytest.mark.parametrize(
    "preset", ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-qwen2", "tiny-vit"]
)
def test_the_blocks_hold_exactly_the_fake_quantized_weights(tmp_path, preset):
    """At accuracy level 1 (fp32 compute) the blocks equal PyTorch with fake_quantize_model's
    weights to fp32 rounding: the twin is what the blocks hold, weight for weight (packed QKV,
    Conv1D, a tied head, embedding tables, block sizes that fall back to 16 included)."""
    out = tmp_path / "m"
    args = ["--preset", preset, "--quantize", "int4", "--quant-accuracy-level", "1"]
    assert fx.export_cli(out, *args, "--no-verify", full_model=False) == 0
    manifest = hermes_ort.load_manifest(out)
    model = fx.preset_model(preset)
    fp32 = model.state_dict()
    fp32 = {k: v.clone() for k, v in fp32.items()}
    assert fake_quantize_model(model, Quantization.make("int4", accuracy_level=1))
    changed = [k for k, v in model.state_dict().items() if not (v == fp32[k]).all()]
    assert changed  # it did quantize
    with hermes_ort.load(out) as runtime:
        feeds = runtime.sample_inputs(batch_size=1, sequence_length=12, seed=3)
        got = runtime.run(feeds)
    main = manifest.output_names[0]
    want = verify.torch_outputs(model, feeds, [main])[main]
    scale = np.abs(want).max()
    assert np.abs(got[main] - want).max() <= 2e-5 * scale


def test_dynamic_has_no_twin():
    q = Quantization.make("int8", "dynamic")
    assert fake_quantize_model(object(), q) is False


def test_a_decoder_refuses_dynamic_int8_with_the_reason(tmp_path, capsys):
    args = ["--preset", "tiny-llama", "--quantize", "int8", "--quant-method", "dynamic"]
    assert fx.export_cli(tmp_path / "m", *args, full_model=False) == 1
    err = capsys.readouterr().err
    assert "--quant-method dynamic is for encoders" in err and "outlier" in err


def test_a_tied_table_is_one_table_for_the_lookup_and_the_head(tmp_path):
    """The prologue's GatherBlockQuantized and the epilogue's MatMulNBits read the same bytes
    of one shared file: the table is stored once (8 bits: 4096 x 64 = 256 KiB)."""
    config = {**SMALL, "vocab_size": 4096, "num_key_value_heads": 2, "tie_word_embeddings": True}
    ckpt = _save(tmp_path / "ckpt", "LlamaConfig", "LlamaForCausalLM", **config)
    out = tmp_path / "m"
    assert (
        fx.export_cli(
            out, "--model", str(ckpt), "--quantize", "int4", "--head-slices", "1", full_model=False
        )
        == 0
    )
    blocks = {b.name: b for b in hermes_ort.load_manifest(out).blocks}

    def table_location(block: str, op: str) -> tuple[str, str]:
        graph = onnx.load(str(out / blocks[block].path), load_external_data=False).graph
        inits = {t.name: t for t in graph.initializer}
        node = next(n for n in graph.node if n.op_type == op)
        data = inits[node.input[0 if op == "GatherBlockQuantized" else 1]]
        info = {e.key: e.value for e in data.external_data}
        return info["location"], info["offset"]

    lookup = table_location("prologue", "GatherBlockQuantized")
    head = table_location("epilogue", "MatMulNBits")
    assert lookup == head and lookup[0].startswith("shared")
    _runs(out)
