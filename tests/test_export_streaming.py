"""Streaming export (--streaming): layer by layer from a checkpoint's safetensors. The result must
be the same model as the regular export: same tokens as transformers, same logits."""

from __future__ import annotations

import numpy as np
import pytest

try:  # tests/ on sys.path (pytest's default import mode) or tests/ as a package
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

import hermes_ort
from hermes_ort.core.manifest import load_manifest

PROMPT = [5, 17, 99, 3, 42, 7]
LAYERS = 5


def _tiny_llama(path, num_layers: int = LAYERS, safe: bool = True):
    model = fx.noisy_llama(
        vocab_size=500,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model.save_pretrained(path, safe_serialization=safe)
    return model


@pytest.fixture
def streamed(exported_streams, private):
    """The exports, private copies for this test."""
    return {k: (private(a), private(b), m) for k, (a, b, m) in exported_streams.items()}


@pytest.fixture(scope="module")
def exported_streams(tmp_path_factory):
    """name -> (regular export, streamed export, torch model)."""
    root = tmp_path_factory.mktemp("streaming")
    made = {}
    for name, build in (
        ("llama", lambda p: _tiny_llama(p)),
        ("gpt2", lambda p: fx.save_tiny_gpt2(p, n_layer=LAYERS)),
    ):
        model = build(root / f"ckpt-{name}")
        regular, stream = root / f"{name}-regular", root / f"{name}-streamed"
        assert fx.export_cli(regular, "--model", str(root / f"ckpt-{name}")) == 0
        assert fx.export_cli(stream, "--model", str(root / f"ckpt-{name}"), "--streaming") == 0
        made[name] = (regular, stream, model)
    return made


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_streamed_export_generates_like_transformers(streamed, name):
    import torch

    regular, stream, model = streamed[name]
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=0,
        )[0].numpy()
    with hermes_ort.load(stream, memory_budget="min") as m:
        np.testing.assert_array_equal(m.generate(PROMPT, max_new_tokens=16), expected)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_streamed_blocks_equal_the_regular_export(streamed, name):
    regular, stream, _ = streamed[name]
    a, b = load_manifest(regular), load_manifest(stream)
    assert [x.name for x in a.blocks] == [x.name for x in b.blocks]
    assert [x.layers for x in b.blocks if x.kind == "layers"] == [(i,) for i in range(LAYERS)]
    assert [t.name for t in a.inputs] == [t.name for t in b.inputs]
    assert [t.name for t in a.outputs] == [t.name for t in b.outputs]
    assert b.full_model is None and "streaming" in b.verification
    assert b.source["streaming"] is True
    assert (stream / "config.json").read_text() == (regular / "config.json").read_text()
    with hermes_ort.load(regular) as ma, hermes_ort.load(stream) as mb:
        feeds = ma.sample_inputs(sequence_length=9, seed=3)
        want, got = ma.run(feeds), mb.run(feeds)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0)


def test_whole_model_strategies_need_the_regular_export(streamed):
    _, stream, _ = streamed["llama"]
    with pytest.raises(hermes_ort.HermesError, match="whole-model file"):
        hermes_ort.load(stream, strategy="full")


def test_streaming_needs_a_safetensors_checkpoint(tmp_path, capsys):
    _tiny_llama(tmp_path / "ckpt", safe=False)
    assert fx.export_cli(tmp_path / "m", "--model", str(tmp_path / "ckpt"), "--streaming") == 1
    assert "safetensors" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not fx.leftovers(tmp_path)
    assert fx.export_cli(tmp_path / "p", "--preset", "tiny-llama", "--streaming") == 1
    assert "--streaming exports a local checkpoint directory" in capsys.readouterr().err


@pytest.mark.parametrize("template_layers", [4, 5])
def test_any_template_length_gives_the_same_model(tmp_path, monkeypatch, template_layers):
    """The template's last layer is the source of every later one, whatever the template's
    length: a 7-layer checkpoint streamed from a 4- or 5-layer template equals its regular export
    (same logits and KV cache)."""
    from hermes_ort.export import streaming

    monkeypatch.setattr(streaming, "TEMPLATE_LAYERS", template_layers)
    _tiny_llama(tmp_path / "ckpt", num_layers=7)
    regular, stream = tmp_path / "regular", tmp_path / "streamed"
    assert fx.export_cli(regular, "--model", str(tmp_path / "ckpt")) == 0
    assert fx.export_cli(stream, "--model", str(tmp_path / "ckpt"), "--streaming") == 0
    manifest = load_manifest(stream)
    assert f"the {template_layers}-layer template" in manifest.verification["streaming"]
    assert [b.layers for b in manifest.blocks if b.kind == "layers"] == [(i,) for i in range(7)]
    with hermes_ort.load(regular) as ma, hermes_ort.load(stream) as mb:
        feeds = ma.sample_inputs(sequence_length=9, seed=3)
        want, got = ma.run(feeds), mb.run(feeds)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0)
