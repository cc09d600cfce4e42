"""Which blocks run on the last position only (tensors/last_position.py), what they are fed, and
the prefill's chunk arithmetic (tensors/prefill.py), on manifests written here (no model run)."""

from __future__ import annotations

import numpy as np
import pytest

from hermes_ort.core.errors import OptionError
from hermes_ort.core.manifest import parse_manifest
from hermes_ort.tensors.last_position import (
    last_logits_only,
    last_position_inputs,
    position_wise_blocks,
)
from hermes_ort.tensors.prefill import check_prefill_chunk, prefill_spans

CACHE = [
    {"name": f"past_key_values.0.{kv}", "dtype": "float32", "shape": ["batch_size", 2, "p", 4]}
    for kv in ("key", "value")
]
PRESENT = [
    {"name": f"present.0.{kv}", "dtype": "float32", "shape": ["batch_size", 2, "t", 4]}
    for kv in ("key", "value")
]


def manifest(blocks: list[tuple[str, str, list[str], list[str]]], outputs=("logits",), cache=True):
    """A manifest of `blocks` (name, kind, inputs, outputs); a decoder unless `cache` is False."""
    ids = [{"name": n, "dtype": "int64", "shape": ["batch_size", "s"]} for n in ("input_ids",)]
    mask = [{"name": "attention_mask", "dtype": "int64", "shape": ["batch_size", "t"]}]
    out = [{"name": n, "dtype": "float32", "shape": ["batch_size", "s", 9]} for n in outputs]
    return parse_manifest(
        {
            "schema_version": 2,
            "name": "m",
            "family": "x",
            "task": "text-generation-with-past",
            "source": {},
            "inputs": ids + mask + (CACHE if cache else []),
            "outputs": out + (PRESENT if cache else []),
            "blocks": [
                {
                    "name": name,
                    "kind": kind,
                    "layers": [0] if kind == "layers" else [],
                    "path": f"blocks/{name}.onnx",
                    "inputs": ins,
                    "outputs": outs,
                    "files": [{"path": f"blocks/{name}.onnx", "bytes": 1, "sha256": "0"}],
                }
                for name, kind, ins, outs in blocks
            ],
            "full_model": None,
        }
    )


BODY = [
    ("prologue", "prologue", ["input_ids", "attention_mask"], ["h0", "m"]),
    (
        "layer_00",
        "layers",
        ["h0", "m", "past_key_values.0.key", "past_key_values.0.value"],
        ["h1", "present.0.key", "present.0.value"],
    ),
]


def test_a_decoders_epilogue_is_position_wise():
    m = manifest([*BODY, ("epilogue", "epilogue", ["h1"], ["logits"])])
    assert position_wise_blocks(m) == {2}


def test_vocabulary_slices_and_their_concat_are_position_wise():
    heads = [(f"head_{k}", "head", ["h1"], [f"logits.head_{k}"]) for k in range(3)]
    concat = ("epilogue", "epilogue", [f"logits.head_{k}" for k in range(3)], ["logits"])
    assert position_wise_blocks(manifest([*BODY, *heads, concat])) == {2, 3, 4, 5}


def test_nothing_is_cut_in_a_model_without_a_kv_cache():
    """An encoder's token logits, or a decoder exported without its cache: never cut."""
    blocks = [BODY[0], ("epilogue", "epilogue", ["h0"], ["logits"])]
    assert position_wise_blocks(manifest(blocks, cache=False)) == set()


def test_a_block_whose_output_is_not_only_logits_stays_whole():
    """An epilogue returning the hidden states too, or one a layer reads, would cut them."""
    both = manifest([*BODY, ("epilogue", "epilogue", ["h1"], ["logits", "h"])], ("logits", "h"))
    assert position_wise_blocks(both) == set()
    read = [
        BODY[0],
        ("epilogue", "epilogue", ["h0"], ["x", "logits"]),
        ("layer_00", "layers", [*BODY[1][2], "x"], BODY[1][3]),
    ]
    assert position_wise_blocks(manifest(read)) == set()


def test_the_last_position_is_fed_and_the_shape_vector_follows():
    hidden = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    inputs = {
        "h": hidden,
        "shape": np.array([-1, 5, 3], np.int64),  # optimum gpt2's Reshape target
        "slice": np.ones((2, 1, 7), np.float32),  # a HEAD slice's logits: already one position
        "mask": np.ones((2, 5), np.int64),  # not [rows, positions, ...]: as is
    }
    out = last_position_inputs(inputs, rows=2, positions=5)
    np.testing.assert_array_equal(out["h"], hidden[:, -1:])
    assert out["h"].flags.c_contiguous and out["h"].base is None  # a copy, not a view
    np.testing.assert_array_equal(out["shape"], [-1, 1, 3])
    np.testing.assert_array_equal(inputs["shape"], [-1, 5, 3])  # the routed tensors unchanged
    assert out["slice"] is inputs["slice"] and out["mask"] is inputs["mask"]
    assert last_position_inputs(inputs, rows=2, positions=1) is inputs  # a decode step


def test_logits_not_cut_by_the_blocks_are_cut_after():
    logits = np.random.default_rng(0).standard_normal((2, 4, 9)).astype(np.float32)
    out = last_logits_only({"logits": logits}, "logits")
    np.testing.assert_array_equal(out["logits"], logits[:, -1:])
    one = {"logits": logits[:, :1]}
    assert last_logits_only(one, "logits") is one


@pytest.mark.parametrize("bad", [0, -3, 2.5, "4", True, [4]])
def test_a_bad_prefill_chunk_is_refused(bad):
    with pytest.raises(OptionError, match="prefill_chunk must be a whole number"):
        check_prefill_chunk(bad)


def test_prefill_spans():
    assert check_prefill_chunk(None) is None and check_prefill_chunk(3) == 3
    assert prefill_spans(8, None) == [(0, 8)]
    assert prefill_spans(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert prefill_spans(8, 1) == [(i, i + 1) for i in range(8)]
    assert prefill_spans(8, 100) == [(0, 8)]
