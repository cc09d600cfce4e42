"""Clear errors, and no half-written model directory after a failed or interrupted export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

from export import storage, verify
from export.stack import find_layer_stack
from hermes_ort.errors import ExportError

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_preset_lists_the_available_ones(tmp_path, capsys):
    assert fx.export_cli(tmp_path / "m", "--preset", "bert-huge") == 1
    err = capsys.readouterr().err
    assert "unknown preset 'bert-huge'" in err
    for name in ("bert-base", "gpt2-xl", "tiny-bert", "tiny-gpt2", "tiny-vit", "vit-large"):
        assert name in err
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_directory(tmp_path, capsys):
    assert fx.export_cli(tmp_path / "m", "--model", str(tmp_path / "no-such-ckpt")) == 1
    assert (
        f"checkpoint directory '{tmp_path / 'no-such-ckpt'}' not found" in capsys.readouterr().err
    )
    assert list(tmp_path.iterdir()) == []


def test_hub_id_when_offline_fails_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fx.export_cli(tmp_path / "m", "--model", "some-org/some-model") == 1
    err = capsys.readouterr().err
    assert "'some-org/some-model' not found" in err and "offline" in err


def test_directory_without_config_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    assert fx.export_cli(tmp_path / "m", "--model", str(tmp_path / "ckpt")) == 1
    assert "has no config.json" in capsys.readouterr().err


def test_uncuttable_architecture_is_named(tmp_path, capsys):
    """ALBERT shares one layer across its depth: there is no per-layer module list to cut along."""
    from transformers import AlbertConfig, AlbertModel

    config = AlbertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        embedding_size=16,
        vocab_size=100,
    )
    AlbertModel(config).save_pretrained(tmp_path / "albert")
    assert fx.export_cli(tmp_path / "m", "--model", str(tmp_path / "albert")) == 1
    assert "unsupported architecture 'AlbertModel'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["albert"]


def test_model_without_repeated_layers_is_unsupported():
    from torch import nn

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))

    with pytest.raises(ExportError, match="unsupported architecture 'Mlp'.*no repeated layer list"):
        find_layer_stack(Mlp())


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert fx.export_cli(out, "--preset", "tiny-gpt2") == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert fx.export_cli(out, "--preset", "tiny-gpt2", "--force") == 1  # not a model directory
    assert "not a hermes-ort model directory" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_verification_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(verify, "TOLERANCE_FP32", -1.0)  # every comparison fails
    assert fx.export_cli(tmp_path / "m", "--preset", "tiny-gpt2") == 1
    assert "verification failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    real = storage.optimise_block
    calls = []

    def interrupt_on_third_block(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(storage, "optimise_block", interrupt_on_third_block)
    assert fx.export_cli(tmp_path / "m", "--preset", "tiny-bert") == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_after_success(tmp_path, monkeypatch):
    out = tmp_path / "m"
    assert fx.export_cli(out, "--preset", "tiny-gpt2") == 0
    before = (out / "manifest.json").read_text()

    with monkeypatch.context() as m:
        m.setattr(verify, "TOLERANCE_FP32", -1.0)
        assert fx.export_cli(out, "--preset", "tiny-gpt2", "--seed", "1", "--force") == 1
    assert (out / "manifest.json").read_text() == before  # the old model is untouched
    assert fx.leftovers(tmp_path) == []

    assert fx.export_cli(out, "--preset", "tiny-gpt2", "--seed", "1", "--force") == 0
    after = json.loads((out / "manifest.json").read_text())
    assert after["source"] == {"kind": "preset", "name": "tiny-gpt2", "seed": 1}
    assert (
        after["blocks"][1]["files"][1]["sha256"]
        != json.loads(before)["blocks"][1]["files"][1]["sha256"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_python_m_export_runs_the_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "export", "--preset", "nope", "--out", str(tmp_path / "m")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "available presets: bert-base, bert-large, gpt2" in proc.stderr
