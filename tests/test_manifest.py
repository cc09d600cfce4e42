"""The manifest is validated on load; every problem names the file and the field."""

from __future__ import annotations

import json

import pytest

import hermes_ort
from hermes_ort.core.manifest import last_consumers, load_manifest, parse_manifest


@pytest.fixture
def raw(toy_dir):
    return json.loads((toy_dir / "manifest.json").read_text())


def test_round_trip(toy_dir, tmp_path):
    manifest = load_manifest(toy_dir)
    manifest.save(tmp_path)
    assert load_manifest(tmp_path) == manifest
    assert manifest.input_names == ("input_ids", "attention_mask")
    assert [b.kind for b in manifest.blocks] == ["prologue"] + ["layers"] * 4 + ["epilogue"]
    assert manifest.blocks_bytes == sum(f.bytes for b in manifest.blocks for f in b.files)


def test_last_consumers(toy_dir):
    last = last_consumers(load_manifest(toy_dir))
    assert last["input_ids"] == 0 and last["h_1"] == 2 and last["logits"] == 6


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.update(schema_version=99), "unsupported schema_version 99"),
        (lambda d: d.pop("blocks"), "missing field 'blocks'"),
        (lambda d: d.update(blocks=[]), "no blocks"),
        (
            lambda d: d["blocks"][1].update(kind="middle"),
            r"blocks\[1\]: unknown block kind 'middle'",
        ),
        (lambda d: d["blocks"][2].update(path="/etc/passwd"), "'/etc/passwd' must be relative"),
        (
            lambda d: d["blocks"][2]["files"][1].update(path="../../x.data"),
            "'../../x.data' must be relative",
        ),
        (
            lambda d: d["blocks"][2]["files"][1].update(path="blocks/x.data\0.onnx"),
            "must be relative",
        ),
        (lambda d: d["full_model"].update(path="/tmp/model.onnx"), "full_model: path"),
        (lambda d: d["blocks"][2].update(path="blocks/other.onnx"), "not listed in its files"),
        (
            lambda d: d["blocks"][3].update(inputs=["h_9", "mask"]),
            "block 'layer_02' consumes \\['h_9'\\]",
        ),
        (
            lambda d: d["outputs"][0].update(name="scores"),
            "model outputs \\['scores'\\] are produced by no block",
        ),
        (lambda d: d["inputs"][0].update(shape="BxS"), "inputs\\[0\\]: field 'shape' has type str"),
    ],
)
def test_bad_manifest_is_named(raw, mutate, message):
    mutate(raw)
    with pytest.raises(hermes_ort.ManifestError, match=message):
        parse_manifest(raw)


def test_missing_and_malformed_files(tmp_path, toy_dir):
    with pytest.raises(hermes_ort.ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(hermes_ort.ManifestError, match="manifest.json' not found"):
        load_manifest(tmp_path)
    (toy_dir / "manifest.json").write_text("{ not json")
    with pytest.raises(hermes_ort.ManifestError, match="not valid JSON"):
        hermes_ort.load(toy_dir)


def test_symlink_escaping_the_model_dir_is_refused(toy_dir, tmp_path):
    outside = tmp_path / "elsewhere.data"
    victim = toy_dir / "blocks" / "layer_00.data"
    outside.write_bytes(victim.read_bytes())
    victim.unlink()
    victim.symlink_to(outside)
    with pytest.raises(hermes_ort.IntegrityError, match="outside the model directory"):
        hermes_ort.load(toy_dir, window=2, verify="size")


def test_symlink_inside_the_model_dir_is_followed(toy_dir):
    data = toy_dir / "blocks" / "layer_00.data"
    (toy_dir / "blocks" / "store").mkdir()  # ORT wants external data beside its .onnx or below
    data.rename(toy_dir / "blocks" / "store" / "moved.data")
    data.symlink_to(toy_dir / "blocks" / "store" / "moved.data")
    with hermes_ort.load(toy_dir, window=2) as model:
        assert model.run(model.sample_inputs())["logits"].shape == (1, 16, 50)


def test_manifest_linked_from_outside_is_refused(toy_dir, tmp_path):
    outside = tmp_path / "elsewhere.json"
    (toy_dir / "manifest.json").rename(outside)
    (toy_dir / "manifest.json").symlink_to(outside)
    with pytest.raises(hermes_ort.ManifestError, match="outside the model directory"):
        load_manifest(toy_dir)
