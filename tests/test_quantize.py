"""Quantized exports: int4 and int8 weights in every block (and the whole-model file), the
manifest's record of them, the accuracy floors the verification holds them to, and the exact
property that matters for streaming: every strategy's outputs on a quantized model equal the
quantized whole model's within 1e-5 (streaming adds no error of its own)."""

from __future__ import annotations

import json
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

EXACT = 1e-5
CASES = {
    "bert-int8": ["--preset", "tiny-bert", "--quantize", "int8", "--quant-method", "dynamic"],
    "bert-int4": ["--preset", "tiny-bert", "--quantize", "int4", "--quant-block-size", "16"],
    "llama-int4": ["--preset", "tiny-llama", "--quantize", "int4", "--quant-block-size", "16"],
    "llama-int8": ["--preset", "tiny-llama", "--quantize", "int8"],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for name, args in CASES.items():
        assert fx.export_cli(root / name, *args) == 0, name
        out[name] = root / name
    assert fx.export_cli(root / "llama-fp32", "--preset", "tiny-llama") == 0
    out["llama-fp32"] = root / "llama-fp32"
    return out


def _ops(model_dir: Path) -> set[str]:
    manifest = hermes_ort.load_manifest(model_dir)
    ops = set()
    for b in manifest.blocks:
        ops |= {
            n.op_type
            for n in onnx.load(str(model_dir / b.path), load_external_data=False).graph.node
        }
    return ops


def _weight_matmuls(model_dir: Path) -> list[str]:
    """The MatMul nodes of the blocks that multiply by a constant weight (left unquantized)."""
    found = []
    for b in hermes_ort.load_manifest(model_dir).blocks:
        graph = onnx.load(str(model_dir / b.path), load_external_data=False).graph
        inits = {t.name for t in graph.initializer}
        found += [
            n.name
            for n in graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and "/offsets/" not in n.name
        ]  # not nbits.py's offset terms ([.., K / bs] block sums x offsets)
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_the_manifest_records_the_quantization_and_the_verification(exported, name):
    m = hermes_ort.load_manifest(exported[name])
    mode = CASES[name][CASES[name].index("--quantize") + 1]
    assert m.schema_version == 2 and m.quantization["mode"] == mode
    v = m.verification
    assert v["quantized"] == mode and v["quality"]["cosine"] >= v.get("cosine_floor", 0)
    if "same_weights" in v:  # the graph against PyTorch holding the same dequantized weights
        assert v["same_weights"]["cosine"] >= v["same_weights_cosine_floor"]
    assert v["blocks_vs_full_max_abs_diff"] <= EXACT
    # no working files left (int4 exports left an empty .scratch/): listed files and their folders
    kept = {"manifest.json", "config.json", "generation_config.json", *m.all_files()}
    kept |= {Path(f).parent.as_posix() for f in kept} - {"."}
    entries = {p.relative_to(exported[name]).as_posix() for p in exported[name].rglob("*")}
    assert entries - kept == set()


def test_int4_blocks_use_matmulnbits_and_int8_dynamic_matmulinteger(exported):
    assert "MatMulNBits" in _ops(exported["bert-int4"])
    assert not _weight_matmuls(exported["bert-int4"])  # attention's (activation x activation) stay
    int8 = _ops(exported["bert-int8"])
    assert int8 & {"MatMulInteger", "DynamicQuantizeMatMul"} and "MatMulNBits" not in int8
    llama = _ops(exported["llama-int4"])  # the fused graph: ONNX Runtime's contrib ops
    assert {"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= llama
    assert "GatherBlockQuantized" in llama  # the embedding table too
    # int8 defaults to MatMulNBits (dynamic's per-tensor activation scales lose accuracy)
    assert "MatMulNBits" in _ops(exported["llama-int8"])
    assert hermes_ort.load_manifest(exported["llama-int8"]).quantization["method"] == "nbits"


def _weight_bytes(model_dir: Path) -> int:
    """Bytes of the blocks' initializers, less the fused graph's rotary caches (optimum's graph
    computes them; at TinyLlama's size they are 0.5 MB of a 28 MB int4 layer, here the most)."""
    manifest, total = hermes_ort.load_manifest(model_dir), 0
    for b in manifest.blocks:
        model = onnx.load(str(model_dir / b.path))  # its weights loaded
        for t in model.graph.initializer:
            if "/rotary/" not in t.name:
                total += onnx.numpy_helper.to_array(t).nbytes
    return total


def test_int4_is_a_fraction_of_the_fp32_bytes(exported):
    fp32, int4 = _weight_bytes(exported["llama-fp32"]), _weight_bytes(exported["llama-int4"])
    # 4 bits + an fp32 scale per 16 weights = 0.19x; the int8 head and the fp32 norms add a little
    assert int4 < 0.3 * fp32, (int4, fp32)


@pytest.mark.parametrize("name", ["bert-int8", "bert-int4"])
def test_every_strategy_equals_the_quantized_whole_model(exported, name, private):
    model_dir = private(exported[name])
    with hermes_ort.load(model_dir, strategy="full") as full:
        feeds = full.sample_inputs(batch_size=2, sequence_length=12, seed=1)
        want = full.run(feeds)
    for strategy in hermes_ort.STRATEGIES:
        for load_path in ("default", "stream"):
            with hermes_ort.load(model_dir, strategy=strategy, load_path=load_path) as model:
                got = model.run(feeds)
            for key in want:
                np.testing.assert_allclose(
                    got[key], want[key], atol=EXACT, rtol=0, err_msg=strategy
                )


@pytest.mark.parametrize("name", ["llama-int4", "llama-int8"])
def test_every_strategy_generates_the_quantized_whole_model_s_tokens(exported, name, private):
    model_dir = private(exported[name])
    prompt = [5, 17, 99, 3, 42, 7, 250, 11]
    with hermes_ort.load(model_dir, strategy="full") as full:
        want = full.generate(prompt, max_new_tokens=12, eos_token_id=[])
    for kwargs in (
        dict(strategy="pipeload"),
        dict(memory_budget="min"),
        dict(strategy="ondemand"),
        dict(strategy="pipeswitch"),
        dict(window=2, loaders=2),
    ):
        with hermes_ort.load(model_dir, **kwargs) as model:
            np.testing.assert_array_equal(model.generate(prompt, 12, eos_token_id=[]), want)


def test_streamed_int4_blocks_are_prepacked(exported, private):
    """MatMulNBits runs fast only prepacked: a streamed int4 block is opened with prepacking;
    int8 dynamic blocks stay mapped (their kernel needs no packing)."""
    for name, packed in (("bert-int4", True), ("bert-int8", False)):
        with hermes_ort.load(private(exported[name]), memory_budget="min") as model:
            streamed = [b for b in model.plan.blocks[1:] if not b.resident]
            assert streamed and all(b.settings.prepack == packed for b in streamed), name


def test_a_model_below_its_accuracy_floor_is_refused(tmp_path, capsys):
    args = ["--preset", "tiny-bert", "--quantize", "int8", "--quant-method", "dynamic"]
    args += ["--accuracy-floor", "1"]  # dynamic has no same-weights twin: the fp32 floor holds
    assert fx.export_cli(tmp_path / "m", *args) == 1  # no quantized model reaches cosine 1
    err = capsys.readouterr().err
    assert "below the floor 1.0 for int8" in err and not (tmp_path / "m").exists()


def test_bad_quantization_options_are_named(tmp_path, capsys):
    args = ["--preset", "tiny-bert", "--quantize", "int4", "--quant-method", "dynamic"]
    assert fx.export_cli(tmp_path / "m", *args) == 1
    assert "int4 with method 'dynamic' is not supported" in capsys.readouterr().err
    args = ["--preset", "tiny-bert", "--quantize", "int4", "--quant-block-size", "24"]
    assert fx.export_cli(tmp_path / "n", *args) == 1
    assert "block size 24 must be a power of two" in capsys.readouterr().err


def test_schema_1_directories_still_load(toy_dir):
    data = json.loads((toy_dir / "manifest.json").read_text())
    assert data["schema_version"] == 1 and hermes_ort.load_manifest(toy_dir).quantization is None
    data["schema_version"] = 3
    (toy_dir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(hermes_ort.ManifestError, match="unsupported schema_version 3"):
        hermes_ort.load_manifest(toy_dir)
