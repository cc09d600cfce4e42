"""End-to-end exports of tiny models: manifest, files, numerics, tied weights, layer grouping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

try:  # tests/ on sys.path (pytest's default import mode) or tests/ as a package
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

from hermes_ort.core.manifest import load_manifest

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """Each tiny model exported once: name -> (model dir, independently built torch model)."""
    root = tmp_path_factory.mktemp("exports")
    ckpt = root / "ckpt-gpt2"
    made = {
        "tiny-bert": (["--preset", "tiny-bert"], lambda: fx.preset_model("tiny-bert")),
        "tiny-vit": (["--preset", "tiny-vit"], lambda: fx.preset_model("tiny-vit")),
        "tiny-gpt2": (["--preset", "tiny-gpt2"], lambda: fx.preset_model("tiny-gpt2")),
        "tiny-bert-lpb2": (
            ["--preset", "tiny-bert", "--layers-per-block", "2"],
            lambda: fx.preset_model("tiny-bert"),
        ),
        "ckpt-gpt2-lpb2": (
            ["--model", str(ckpt), "--layers-per-block", "2"],
            lambda: fx.save_tiny_gpt2(ckpt),
        ),
    }
    result = {}
    for name, (args, build) in made.items():
        model = build()  # the checkpoint must exist before its export
        out = root / name
        assert fx.export_cli(out, *args) == 0, name
        result[name] = (out, model)
    return result


ALL = ["tiny-bert", "tiny-vit", "tiny-gpt2", "tiny-bert-lpb2", "ckpt-gpt2-lpb2"]
GPT2S = ["tiny-gpt2", "ckpt-gpt2-lpb2"]


@pytest.mark.parametrize("name", ALL)
def test_manifest_lists_blocks_in_order_with_relative_paths(exports, name):
    model_dir, model = exports[name]
    manifest = load_manifest(model_dir)  # the runtime's own parser: schema, paths, dataflow
    kinds = [b.kind for b in manifest.blocks]
    assert kinds[0] == "prologue" and kinds[-1] == "epilogue"
    assert set(kinds[1:-1]) == {"layers"}
    layers = [layer for b in manifest.blocks for layer in b.layers]
    assert layers == list(range(model.config.num_hidden_layers))
    for block in manifest.blocks:
        assert block.path == f"blocks/{block.name}.onnx" == block.files[0].path
        graph = onnx.load(str(model_dir / block.path), load_external_data=False).graph
        inits = {t.name for t in graph.initializer}
        assert tuple(v.name for v in graph.input if v.name not in inits) == block.inputs
        assert tuple(v.name for v in graph.output) == block.outputs
    fulls = [manifest.full_model, manifest.full_model_mmap]
    paths = [f.path for b in manifest.blocks for f in b.files] + [
        f.path for m in fulls for f in m.files
    ]
    for path in paths:
        assert not Path(path).is_absolute() and ".." not in Path(path).parts
        assert (model_dir / path).resolve().is_relative_to(model_dir.resolve())
    # below 2 GB: one file with the weights inside (as optimum users get it), and the same model
    # with its weights in an aligned external data file (for mmap)
    assert [f.path for f in manifest.full_model.files] == ["full/model_inline.onnx"]
    assert [f.path for f in manifest.full_model_mmap.files] == [
        "full/model.onnx",
        "full/model.onnx_data",
    ]
    assert manifest.sample["batch_size"] == 1 and manifest.sample["sequence_length"] == fx.SEQ_LEN
    positions = getattr(model.config, "max_position_embeddings", None)
    assert manifest.sample.get("max_sequence_length") == (None if name == "tiny-vit" else positions)
    v = manifest.verification
    assert v["reference"] == "pytorch" and v["sample"] == "random ids"  # no tokenizer here
    assert 0 <= v["max_abs_diff"] <= TOLERANCE
    assert v["blocks_max_relative_diff"] <= v["tolerance_relative"]
    assert max(v["full_model_max_abs_diff"].values()) <= TOLERANCE
    for pkg in ("torch", "transformers", "optimum", "onnx", "onnxruntime"):
        assert manifest.versions[pkg]


@pytest.mark.parametrize("name", ALL)
def test_every_file_is_listed_with_its_sha256(exports, name):
    model_dir, _ = exports[name]
    manifest = load_manifest(model_dir)
    fulls = [manifest.full_model, manifest.full_model_mmap]
    listed = {**manifest.block_files(), **{f.path: f for m in fulls for f in m.files}}
    for path, spec in listed.items():
        assert (model_dir / path).stat().st_size == spec.bytes, path
        assert fx.sha256(model_dir / path) == spec.sha256, path
    on_disk = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert on_disk - set(listed) == {"manifest.json", "config.json"} | (
        {"generation_config.json"} if (model_dir / "generation_config.json").exists() else set()
    )
    folders = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_dir()}
    assert folders == {"blocks", "full"}  # no working directory (.scratch/) left, even empty
    assert fx.leftovers(model_dir.parent) == []


@pytest.mark.parametrize("name", ALL)
def test_chained_blocks_match_pytorch(exports, name):
    model_dir, model = exports[name]
    manifest = json.loads((model_dir / "manifest.json").read_text())
    feed = fx.sample_inputs([i["name"] for i in manifest["inputs"]], model.config)
    names = [o["name"] for o in manifest["outputs"]]
    want = fx.torch_run(model, feed, names)
    got = fx.chain_blocks(model_dir, feed)
    fulls = [
        fx.ort_session(model_dir / f"full/{f}").run(names, feed)
        for f in ("model.onnx", "model_inline.onnx")
    ]
    for i, n in enumerate(names):
        assert got[n].shape == want[n].shape
        assert np.abs(got[n] - want[n]).max() <= TOLERANCE, n
        for full in fulls:
            assert np.abs(full[i] - want[n]).max() <= TOLERANCE, n
    assert np.abs(want[names[0]]).max() > 10 * TOLERANCE  # the comparison is not trivially small


@pytest.mark.parametrize("name", ALL)
def test_weights_are_external_and_aligned(exports, name):
    model_dir, _ = exports[name]
    manifest = load_manifest(model_dir)
    for block in manifest.blocks:
        files = {Path(f.path).name for f in block.files}
        model = onnx.load(str(model_dir / block.path), load_external_data=False)
        for t in model.graph.initializer:
            size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize * int(
                np.prod(t.dims)
            )
            if size >= 1024:
                info = {e.key: e.value for e in t.external_data}
                assert t.data_location == onnx.TensorProto.EXTERNAL, t.name
                assert info["location"] in files and int(info["offset"]) % 65536 == 0
                assert int(info["length"]) == size
            else:
                assert t.data_location != onnx.TensorProto.EXTERNAL, t.name


@pytest.mark.parametrize("name", GPT2S)
def test_tied_embedding_is_stored_once_in_shared_data(exports, name):
    model_dir, model = exports[name]
    manifest = load_manifest(model_dir)
    readers = [b.name for b in manifest.blocks if "blocks/shared.data" in {f.path for f in b.files}]
    assert readers == ["prologue", "epilogue"]
    vocab, hidden = model.config.vocab_size, model.config.n_embd
    wte = model.transformer.wte.weight.detach().numpy()
    places = set()
    for block in manifest.blocks:
        graph = onnx.load(str(model_dir / block.path), load_external_data=False).graph
        assert not any(
            n.op_type == "Transpose" and n.input[0] == "transformer.wte.weight" for n in graph.node
        )
        for t in graph.initializer:
            if list(t.dims) in ([vocab, hidden], [hidden, vocab]):
                info = {e.key: e.value for e in t.external_data}
                places.add((info["location"], int(info["offset"])))
        if block.kind == "epilogue":
            assert any(
                n.op_type == "FusedMatMul" and n.domain == "com.microsoft" for n in graph.node
            )
    assert places == {("shared.data", 0)}  # one copy, used by both blocks
    shared = np.fromfile(model_dir / "blocks/shared.data", np.float32, count=vocab * hidden)
    np.testing.assert_array_equal(shared.reshape(vocab, hidden), wte)
    full = onnx.load(str(model_dir / "full/model.onnx"), load_external_data=False).graph
    dims = [list(t.dims) for t in full.initializer]
    assert dims.count([vocab, hidden]) == 1 and [hidden, vocab] not in dims  # one copy there too


def test_layers_per_block_groups_consecutive_layers(exports):
    bert = load_manifest(exports["tiny-bert-lpb2"][0])
    assert [(b.name, b.layers) for b in bert.blocks] == [
        ("prologue", ()),
        ("layers_00_01", (0, 1)),
        ("layer_02", (2,)),
        ("epilogue", ()),
    ]
    gpt2 = load_manifest(exports["ckpt-gpt2-lpb2"][0])
    assert [b.layers for b in gpt2.blocks] == [(), (0, 1), (2, 3), ()]
    assert gpt2.source == {
        "kind": "checkpoint",
        "path": str(exports["ckpt-gpt2-lpb2"][0].parent / "ckpt-gpt2"),
    }


def test_bert_signature(exports):
    m = load_manifest(exports["tiny-bert"][0])
    assert m.family == "bert" and m.task == "feature-extraction"
    assert m.source == {"kind": "preset", "name": "tiny-bert", "seed": 0}
    assert [(t.name, t.dtype, t.shape, t.sample) for t in m.inputs] == [
        (
            "input_ids",
            "int64",
            ("batch_size", "sequence_length"),
            {"kind": "randint", "high": 1000},
        ),
        ("attention_mask", "int64", ("batch_size", "sequence_length"), {"kind": "ones"}),
        ("token_type_ids", "int64", ("batch_size", "sequence_length"), {"kind": "zeros"}),
    ]
    assert [(t.name, t.shape) for t in m.outputs] == [
        ("last_hidden_state", ("batch_size", "sequence_length", 64)),
        ("pooler_output", ("batch_size", 64)),
    ]
    assert [b.name for b in m.blocks] == [
        "prologue",
        "layer_00",
        "layer_01",
        "layer_02",
        "epilogue",
    ]


def test_vit_signature(exports):
    m = load_manifest(exports["tiny-vit"][0])
    assert m.family == "vit" and m.task == "image-classification"
    assert [(t.name, t.dtype, t.shape, t.sample) for t in m.inputs] == [
        ("pixel_values", "float32", ("batch_size", 3, 32, 32), {"kind": "normal"}),
    ]
    assert [(t.name, t.shape) for t in m.outputs] == [("logits", ("batch_size", 10))]


def test_gpt2_signature(exports):
    """A decoder is exported with its KV cache: layer i's block reads past_key_values.i.* and
    returns present.i.*, the attention mask spans past + new tokens."""
    m = load_manifest(exports["tiny-gpt2"][0])
    assert m.family == "gpt2" and m.task == "text-generation-with-past"
    past = [f"past_key_values.{i}.{kv}" for i in range(3) for kv in ("key", "value")]
    assert [(t.name, t.sample) for t in m.inputs] == [
        ("input_ids", {"kind": "randint", "high": 1000}),
        *[(name, {"kind": "normal"}) for name in past],
        ("attention_mask", {"kind": "ones"}),
        ("position_ids", {"kind": "arange"}),
    ]
    shapes = {t.name: t.shape for t in m.inputs}
    assert shapes[past[0]] == ("batch_size", 4, "past_sequence_length", 16)
    assert shapes["attention_mask"] == ("batch_size", "total_sequence_length")
    assert m.sample["past_sequence_length"] == 0
    assert [(t.name, t.shape) for t in m.outputs][0] == (
        "logits",
        ("batch_size", "sequence_length", 1000),
    )
    for block in (b for b in m.blocks if b.kind == "layers"):
        (i,) = block.layers
        assert {f"past_key_values.{i}.key", f"past_key_values.{i}.value"} <= set(block.inputs)
        assert {f"present.{i}.key", f"present.{i}.value"} <= set(block.outputs)


def test_a_tensor_can_skip_blocks(exports):
    """The prologue's attention mask is read by every layer block, not relayed through each."""
    m = load_manifest(exports["tiny-bert"][0])
    prologue_out = set(m.blocks[0].outputs)
    layer_blocks = [b for b in m.blocks if b.kind == "layers"]
    skipping = prologue_out.intersection(*(set(b.inputs) for b in layer_blocks))
    assert skipping, "every layer should read a prologue tensor (the mask)"
    for b in layer_blocks:
        assert not skipping & set(b.outputs)


def test_by_default_a_model_directory_holds_its_blocks_only(tmp_path):
    """The weights once: no whole-model files unless --full-model, nothing temporary left, and
    the baselines that need the whole model say how to get it."""
    import hermes_ort

    out = tmp_path / "m"
    assert fx.export_cli(out, "--preset", "tiny-bert", full_model=False) == 0
    manifest = load_manifest(out)
    assert manifest.full_model is None and manifest.full_model_mmap is None
    assert not (out / "full").exists()
    on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert on_disk <= 1.05 * manifest.blocks_bytes, (on_disk, manifest.blocks_bytes)
    assert fx.leftovers(tmp_path) == []
    with hermes_ort.load(out, memory_budget="min") as model:  # the blocks run
        model.run(model.sample_inputs())
    with pytest.raises(hermes_ort.ManifestError, match="export with --full-model"):
        hermes_ort.load(out, strategy="full")
