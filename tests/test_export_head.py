"""`hermes-ort export --head-slices N|auto` (hermes_ort/export/head.py): a causal LM's head as HEAD
blocks over vocabulary slices and a last block joining them. Each sliced export is checked against
the same export unsliced: the manifest, the logits through a plain onnxruntime chain, the bytes on
disk, the whole-model files; and against PyTorch by the export's own verification."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

try:  # tests/ on sys.path (pytest's default import mode) or tests/ as a package
    import export_fixtures as fx
    import gguf_fixtures as gf
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx
    from tests import gguf_fixtures as gf

import hermes_ort
from hermes_ort.export.cli import on_disk
from hermes_ort.export.head import auto_slices, vocab_ranges, widest
from hermes_ort.export.head_graph import tensor_bytes

pytest.importorskip("torch", reason="exporting needs torch (not on the aarch64 board)")

SLICES = 3
RELATIVE = 1e-5  # of the logits' largest magnitude: slicing changes no arithmetic of a logit
# what slicing may add on disk: per block it adds, a page for its graph file and a page for the
# partial last page of each tensor it holds (a slice's rows of a shared table add nothing)
PAGE = 4096
CASES = {
    "tiny-gpt2": ["--preset", "tiny-gpt2"],  # optimum's graph, the head tied (FusedMatMul)
    "tiny-llama-fused": ["--preset", "tiny-llama", "--graph", "fused"],  # MatMul [K, V]
    "tiny-llama-int4": ["--preset", "tiny-llama", "--quantize", "int4"],  # 8-bit MatMulNBits
    # a 4-bit minmax head: MatMulNBits plus nbits.py's offset term (a MatMul and an Add)
    "tiny-llama-int4-head4": [
        "--preset", "tiny-llama", "--quantize", "int4", "--quant-head-bits", "4",
    ],
    "tiny-qwen2-fused": ["--preset", "tiny-qwen2", "--graph", "fused"],  # tied, the fused graph
}  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`exported(case)`: (sliced, whole) model directories of a case, each exported once."""
    root = tmp_path_factory.mktemp("head")
    done: dict[str, tuple[Path, Path]] = {}

    def export(case: str) -> tuple[Path, Path]:
        if case not in done:
            args = CASES[case]
            full = case == "tiny-gpt2"  # the whole-model files, to compare
            sliced, whole = root / f"{case}-sliced", root / f"{case}-whole"
            assert fx.export_cli(sliced, *args, "--head-slices", str(SLICES), full_model=full) == 0
            assert fx.export_cli(whole, *args, full_model=full) == 0
            done[case] = sliced, whole
        return done[case]

    return export


def _feed(model_dir: Path) -> dict[str, np.ndarray]:
    from transformers import AutoConfig

    names = [t.name for t in hermes_ort.load_manifest(model_dir).inputs]
    return fx.sample_inputs(names, AutoConfig.from_pretrained(model_dir), batch=2, seq=7)


@pytest.mark.parametrize("case", list(CASES))
def test_the_head_is_sliced_into_blocks_covering_the_vocabulary(exported, case):
    sliced, _ = exported(case)
    m = hermes_ort.load_manifest(sliced)  # the runtime's parser: schema, dataflow, head record
    kinds = [b.kind for b in m.blocks]
    assert kinds == ["prologue"] + ["layers"] * 3 + ["epilogue"] + ["head"] * SLICES + ["epilogue"]
    head = m.head
    assert head.asked == SLICES and head.vocab_size == 1000 and head.output == "logits"
    assert head.blocks == tuple(f"head_0{k}" for k in range(SLICES))
    starts = [start for start, _ in head.ranges]
    assert starts[0] == 0 and [stop for _, stop in head.ranges] == [*starts[1:], head.vocab_size]
    assert starts == sorted(set(starts))  # none empty
    blocks = {b.name: b for b in m.blocks}
    assert blocks["epilogue"].outputs == (head.input,)
    for name, (start, stop) in zip(head.blocks, head.ranges, strict=True):
        block = blocks[name]
        assert block.inputs == (head.input,) and block.outputs == (f"logits.{name}",)
        graph = onnx.load(str(sliced / block.path), load_external_data=False).graph
        assert graph.output[0].type.tensor_type.shape.dim[-1].dim_value == stop - start
    last = m.blocks[-1]
    assert last.name == "head_concat" and last.inputs == tuple(f"logits.{n}" for n in head.blocks)
    assert last.outputs == ("logits",)
    assert json.loads((sliced / "manifest.json").read_text())["head"]["ranges"][0] == [
        0,
        head.ranges[0][1],
    ]


@pytest.mark.parametrize("case", list(CASES))
def test_sliced_logits_equal_the_whole_heads(exported, case):
    sliced, whole = exported(case)
    feed = _feed(whole)
    got, want = fx.chain_blocks(sliced, feed), fx.chain_blocks(whole, feed)
    assert got.keys() == want.keys()
    scale = float(np.abs(want["logits"]).max())
    assert float(np.abs(got["logits"] - want["logits"]).max()) <= RELATIVE * scale
    for name in want:  # the KV cache: the layers are the same blocks
        if name != "logits":
            np.testing.assert_array_equal(got[name], want[name])
    v = hermes_ort.load_manifest(sliced).verification  # PyTorch vs the sliced blocks, as ever
    assert v.get("blocks_max_relative_diff", 0) <= 1e-4
    if "same_weights" in v:
        assert v["same_weights"]["cosine"] >= v["same_weights_cosine_floor"]


@pytest.mark.parametrize("case", list(CASES))
def test_slicing_moves_the_heads_bytes_without_copying_them(exported, case):
    sliced, whole = exported(case)
    m, w = hermes_ort.load_manifest(sliced), hermes_ort.load_manifest(whole)
    added = [b for b in m.blocks if b.kind == "head" or b.name == "head_concat"]
    tensors = sum(
        len(onnx.load(str(sliced / b.path), load_external_data=False).graph.initializer)
        for b in added
    )
    allowance = PAGE * (len(added) + tensors)
    assert on_disk(sliced, m.block_files()) <= on_disk(whole, w.block_files()) + allowance
    # each slice reads its share of the head's weights, no more
    head_bytes = sum(m.head.bytes)
    assert max(m.head.bytes) < 0.5 * head_bytes
    tied = case in ("tiny-gpt2", "tiny-qwen2-fused")  # fp32 tables of 256 KB: in shared.data
    for name in m.head.blocks:
        block = next(b for b in m.blocks if b.name == name)
        paths = [f.path for f in block.files]
        # a tied table's slice points at its rows of the shared file: no data of its own
        assert (paths[1:] == ["blocks/shared.data"]) if tied else (f"blocks/{name}.data" in paths)


def test_a_head_record_that_misses_part_of_the_vocabulary_is_refused(exported):
    from hermes_ort.core.manifest import parse_manifest

    sliced, _ = exported("tiny-gpt2")
    data = json.loads((sliced / "manifest.json").read_text())
    data["head"]["ranges"][-1][1] -= 1
    with pytest.raises(hermes_ort.ManifestError, match="do not cover 0 .. 1000"):
        parse_manifest(data)


def test_the_whole_model_files_are_the_unsliced_ones(exported):
    sliced, whole = exported("tiny-gpt2")
    m, w = hermes_ort.load_manifest(sliced), hermes_ort.load_manifest(whole)
    assert m.full_model == w.full_model and m.full_model_mmap == w.full_model_mmap  # the hashes
    assert m.verification["full_model_max_relative_diff"] <= 1e-4


def test_info_lists_the_head_blocks(exported, capsys):
    from hermes_ort.cli.main import main

    sliced, _ = exported("tiny-gpt2")
    assert main(["info", str(sliced), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "head_00" in out and "head_concat" in out and "match" in out


def test_auto_slices_a_head_larger_than_a_layer(tmp_path, monkeypatch):
    """tiny-llama: its head (1000 x 64 floats, 256 KB) outweighs a layer (~185 KB of weights),
    but by less than AUTO_WHOLE_UP_TO: the default (auto) leaves it whole; with the threshold at
    one layer, auto cuts it in two."""
    import hermes_ort.export.head as head

    whole = tmp_path / "whole"
    assert fx.export_cli(whole, "--preset", "tiny-llama", full_model=False) == 0
    assert hermes_ort.load_manifest(whole).head is None
    monkeypatch.setattr(head, "AUTO_WHOLE_UP_TO", 1.0)
    out = tmp_path / "m"
    assert (
        fx.export_cli(out, "--preset", "tiny-llama", "--head-slices", "auto", full_model=False) == 0
    )
    m = hermes_ort.load_manifest(out)
    assert m.head.asked == "auto" and len(m.head.blocks) == 2
    graphs = [onnx.load(str(out / b.path), load_external_data=False).graph for b in m.blocks[1:4]]
    layer = max(sum(tensor_bytes(t) for t in g.initializer) for g in graphs)  # weights, no holes
    assert max(m.head.bytes) <= layer < sum(m.head.bytes)


def test_auto_leaves_an_encoder_whole(tmp_path):
    out = tmp_path / "m"
    assert (
        fx.export_cli(out, "--preset", "tiny-bert", "--head-slices", "auto", full_model=False) == 0
    )
    m = hermes_ort.load_manifest(out)
    assert m.head is None and "head" not in [b.kind for b in m.blocks]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "--head-slices must be a number >= 1 or auto, got 0"),
        ("1001", "--head-slices 1001 exceeds the vocabulary of 'tiny-gpt2' (1000 tokens)"),
    ],
)
def test_nonsense_slice_counts_are_refused(tmp_path, capsys, value, message):
    assert fx.export_cli(tmp_path / "m", "--preset", "tiny-gpt2", "--head-slices", value) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_an_explicit_count_is_refused_for_an_encoder(tmp_path, capsys):
    assert fx.export_cli(tmp_path / "m", "--preset", "tiny-bert", "--head-slices", "2") == 1
    assert "slices a causal LM's head" in capsys.readouterr().err


def test_a_gguf_export_is_sliced_and_verified(tmp_path):
    """The tiny GGUF as is: an untied Q8_0 head (MatMulNBits), its Q4_1 table in the prologue."""
    pytest.importorskip("gguf", reason="gguf-py comes with the export extra")
    path = gf.write_gguf(tmp_path / "tiny.gguf", gf.tiny_decoder())
    out = tmp_path / "m"
    assert fx.export_cli(out, "--model", str(path), "--head-slices", "2", full_model=False) == 0
    m = hermes_ort.load_manifest(out)
    assert m.quantization["mode"] == "gguf" and len(m.head.blocks) == 2
    v = m.verification
    assert v["quality"]["cosine"] >= v["cosine_floor"]
    head = onnx.load(str(out / "blocks" / "head_01.onnx"), load_external_data=False).graph
    nbits = next(n for n in head.node if n.op_type == "MatMulNBits")
    width = m.head.ranges[1][1] - m.head.ranges[1][0]
    assert next(a.i for a in nbits.attribute if a.name == "N") == width


def test_vocab_ranges_are_even_and_fall_on_whole_groups_of_rows():
    assert vocab_ranges(1000, 3) == [(0, 333), (333, 666), (666, 1000)]
    assert vocab_ranges(1000, 3, 16) == [(0, 336), (336, 672), (672, 1000)]  # 16-row pages
    assert vocab_ranges(10, 4, 16) == [(0, 2), (2, 5), (5, 7), (7, 10)]  # too few: single rows
    for vocab, count, rows in [(1000, 3, 16), (262144, 7, 2), (50, 50, 4), (10, 4, 16)]:
        ranges = vocab_ranges(vocab, count, rows)
        assert max(b - a for a, b in ranges) == widest(vocab, count, rows)
    assert auto_slices(1000, 256, 100_000) == 3  # 256 KB of head, layers of 100 KB
    assert auto_slices(1000, 256, 200_000) == 1  # within twice a layer: whole
    assert auto_slices(262144, 1152, 20_000_000) == 16  # a Gemma-sized tied table, 8-bit


def _graph(after: list[tuple[str, list]]) -> onnx.GraphProto:
    """x [b, t, 8] -> MatMul(W [8, 12]) -> the ops `after` (op, constant inputs) -> logits."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.ones((8, 12), np.float32), "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y0"], name="/lm_head/MatMul")]
    for i, (op, constants) in enumerate(after):
        names = [f"c{i}_{j}" for j in range(len(constants))]
        for c, name in zip(constants, names, strict=True):
            inits.append(numpy_helper.from_array(np.asarray(c, np.float32), name))
        nodes.append(helper.make_node(op, [f"y{i}", *names], [f"y{i + 1}"], name=f"/{op}"))
    nodes[-1].output[0] = "logits"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 8])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", 12])
    return helper.make_graph(nodes, "epilogue", [x], [out], inits)


def test_a_bias_and_a_soft_cap_after_the_head_join_the_last_block():
    from hermes_ort.export.head_graph import find_head

    cap = [("Add", [np.zeros(12)]), ("Div", [30.0]), ("Tanh", []), ("Mul", [30.0])]
    head = find_head(_graph(cap))
    assert head.x == "x" and head.head_out == "y0" and head.pre == () and head.region == (0,)
    assert head.tail == (1, 2, 3, 4) and [(c.name, c.axis) for c in head.cuts] == [("W", 1)]


def test_a_head_mixing_the_vocabulary_is_left_whole():
    from hermes_ort.export.head_graph import find_head

    why = find_head(_graph([("Softmax", [])]))
    assert isinstance(why, str) and "'/Softmax' (Softmax) is not elementwise" in why
