"""What an export starts from: checkpoints of every task optimum can export, their task inferred
from the architecture as optimum does (and where optimum's own inference misses), and a default
verification length that fits the model."""

from __future__ import annotations

import pytest

try:
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

from hermes_ort.core.manifest import load_manifest

pytest.importorskip("torch", reason="exporting needs torch (not on the aarch64 board)")


@pytest.mark.parametrize(
    "arch,task",
    [
        ("BertModel", "feature-extraction"),
        ("BertForMaskedLM", "fill-mask"),
        ("BertForSequenceClassification", "text-classification"),
        ("BertForTokenClassification", "token-classification"),
        ("GPT2LMHeadModel", "text-generation"),
        ("LlamaForCausalLM", "text-generation"),
        ("ViTForImageClassification", "image-classification"),
        ("DeiTForImageClassification", "image-classification"),  # optimum's own misses it
        ("DeiTModel", "feature-extraction"),
    ],
)
def test_the_task_is_inferred_from_the_architecture(arch, task):
    import transformers

    from hermes_ort.export.checkpoint import infer_task

    assert infer_task(getattr(transformers, arch)) == task


def _save(model_cls: str, config_cls: str, path, **config):
    import torch
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    model.save_pretrained(path)


def test_an_image_classifier_checkpoint_exports_without_a_task(tmp_path):
    _save(
        "DeiTForImageClassification",
        "DeiTConfig",
        tmp_path / "ckpt",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    assert fx.export_cli(tmp_path / "m", "--model", str(tmp_path / "ckpt")) == 0
    manifest = load_manifest(tmp_path / "m")
    assert manifest.task == "image-classification" and manifest.output_names == ("logits",)
    v = manifest.verification
    assert v["blocks_max_relative_diff"] <= v["tolerance_relative"]


def test_the_default_sequence_length_fits_the_model(tmp_path, capsys):
    """A checkpoint with 64 positions exports without --seq-len (its sample is 64 long); asking
    for more than it holds is refused, naming both."""
    fx.noisy_llama(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    ).save_pretrained(tmp_path / "ckpt")
    from hermes_ort.export import cli

    out = tmp_path / "m"
    assert cli.main(["--model", str(tmp_path / "ckpt"), "--out", str(out), "--quiet"]) == 0
    assert load_manifest(out).sample["sequence_length"] == 64
    args = ["--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "n"), "--seq-len", "65"]
    assert cli.main([*args, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--seq-len 65 exceeds the 64 tokens model 'ckpt' can hold" in err
    assert not (tmp_path / "n").exists()


def test_roberta_positions_start_after_the_padding_index(tmp_path, capsys):
    """RoBERTa numbers positions from pad_token_id + 1: of 64 position embeddings 62 fit a
    sequence. The default sample is that long (64 stopped in PyTorch with an IndexError), the
    manifest's max_sequence_length says so, and --seq-len 64 is refused naming the limit."""
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config.update(vocab_size=100, max_position_embeddings=64, pad_token_id=1)
    _save("RobertaModel", "RobertaConfig", tmp_path / "ckpt", **config)
    from hermes_ort.export import cli

    out = tmp_path / "m"
    assert cli.main(["--model", str(tmp_path / "ckpt"), "--out", str(out), "--quiet"]) == 0
    manifest = load_manifest(out)
    assert manifest.family == "roberta"
    assert manifest.sample["sequence_length"] == manifest.sample["max_sequence_length"] == 62
    v = manifest.verification
    assert v["blocks_max_relative_diff"] <= v["tolerance_relative"]
    args = ["--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "n"), "--seq-len", "64"]
    assert cli.main([*args, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--seq-len 64 exceeds the 62 tokens model 'ckpt' can hold" in err
    assert "padding index 1" in err and "--seq-len 62 or less" in err
    assert not (tmp_path / "n").exists()
