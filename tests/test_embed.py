"""Sentence embeddings: all-MiniLM-L6-v2 (real weights) exported and embedded equal to
sentence-transformers' `encode` (cosine >= 1 - 1e-5 per sentence); each pooling mode equal to
sentence-transformers' Pooling module; the pooling a directory declares, or mean pooling said so;
`hermes-ort embed`'s output; an encoder needed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="the text extra (not on the aarch64 board)")

try:  # tests/ on sys.path (pytest's default import mode) or tests/ as a package
    import export_fixtures as fx
    import real_models
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx
    from tests import real_models

import hermes_ort
from hermes_ort.core.choices import PoolingMode
from hermes_ort.core.errors import InputError
from hermes_ort.runtime.embedding import PoolingNotDeclared
from hermes_ort.tensors.pooling import pool, read_pooling

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Hello",
    "Café crème, naïve façade — and a 🙂 for the road!",
    "東京は日本の首都です。",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates by half "
    "a percentage point, its largest increase in two decades, citing persistent inflation.",
    # longer than the checkpoint's max_seq_length (256 tokens): cut as sentence-transformers cuts
    " ".join(["The quick brown fox jumps over the lazy dog near the riverbank at dawn."] * 30),
]
COSINE_FLOOR = 1 - 1e-5


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> tuple[Path, Path]:
    """(the checkpoint, its export by `hermes-ort export --model CKPT --out DIR`)."""
    pytest.importorskip("torch", reason="exporting needs torch (not on the aarch64 board)")
    checkpoint = real_models.all_minilm_l6_v2()
    out = tmp_path_factory.mktemp("minilm") / "all-MiniLM-L6-v2"
    from hermes_ort.export import cli

    assert cli.main(["--model", str(checkpoint), "--out", str(out), "--quiet"]) == 0
    return checkpoint, out


@pytest.fixture(scope="module")
def reference(minilm) -> np.ndarray:
    st = pytest.importorskip("sentence_transformers", reason="the test extra")
    model = st.SentenceTransformer(str(minilm[0]), device="cpu")
    return model.encode(SENTENCES, convert_to_numpy=True)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_export_carries_sentence_transformers_files(minilm):
    _, model_dir = minilm
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (model_dir / name).is_file(), name
    pooling = read_pooling(model_dir)
    assert pooling.modes == (PoolingMode.MEAN,) and pooling.normalize
    assert pooling.declared_by == "1_Pooling/config.json"


def test_embeddings_equal_sentence_transformers(minilm, reference, capsys):
    with hermes_ort.load(minilm[1]) as model:
        got = model.embed(SENTENCES)
    assert got.shape == reference.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    cos = cosines(got, reference)
    with capsys.disabled():
        print(
            f"\nall-MiniLM-L6-v2 vs sentence-transformers: 1 - cosine {1 - cos}, max abs diff "
            f"{np.abs(got - reference).max():.2e}"
        )
    assert (cos >= COSINE_FLOOR).all(), 1 - cos
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # Normalize listed
    assert np.abs(got - reference).max() < 1e-4


def test_batches_and_a_budget_change_nothing(minilm, reference):
    with hermes_ort.load(minilm[1], memory_budget="min") as model:
        batched = model.embed(SENTENCES, batch_size=3)
        one = model.embed(SENTENCES[3])
    assert (cosines(batched, reference) >= COSINE_FLOOR).all()
    assert one.shape == (1, 384)
    np.testing.assert_allclose(one[0], batched[3], atol=1e-5)


def test_without_modules_json_mean_pooling_is_said(minilm, reference, private):
    model_dir = private(minilm[1])
    (model_dir / "modules.json").unlink()
    shutil.rmtree(model_dir / "1_Pooling")
    with hermes_ort.load(model_dir) as model:
        with pytest.warns(PoolingNotDeclared, match="mean pooling"):
            plain = model.embed(SENTENCES[:3])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PoolingNotDeclared)
            unit = model.embed(SENTENCES[:3], normalize=True)
    assert not np.allclose(np.linalg.norm(plain, axis=1), 1.0, atol=1e-3)  # not normalised
    np.testing.assert_allclose(
        plain / np.linalg.norm(plain, axis=1, keepdims=True), unit, atol=1e-6
    )
    assert (cosines(unit, reference[:3]) >= COSINE_FLOOR).all()  # MiniLM pools by the mean


@pytest.mark.parametrize(
    "config",
    [
        {"pooling_mode_cls_token": True},
        {"pooling_mode_max_tokens": True},
        {"pooling_mode_mean_sqrt_len_tokens": True},
        {"pooling_mode": "weightedmean"},
        {"pooling_mode": "lasttoken"},
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},
        {"pooling_mode": ["max", "cls"]},
        {},
    ],
    ids=lambda c: "+".join(f"{k}={v}" for k, v in c.items()) or "nothing",
)
def test_each_pooling_is_sentence_transformers_pooling(tmp_path, config):
    """pool() against sentence-transformers' Pooling module on the same right-padded batch."""
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("sentence_transformers.sentence_transformer.modules")
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 8, **config})
    )
    modules = [{"type": "sentence_transformers.models.Transformer", "path": ""}]
    modules.append({"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its legacy keys
        module = st.Pooling.load(str(tmp_path / "1_Pooling"))
    features = {
        "token_embeddings": torch.from_numpy(hidden),
        "attention_mask": torch.from_numpy(mask),
    }
    want = module(features)["sentence_embedding"].numpy()
    got = pool(hidden, mask, read_pooling(tmp_path))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_module_hermes_ort_does_not_run_is_refused(minilm, private):
    model_dir = private(minilm[1])
    modules = json.loads((model_dir / "modules.json").read_text())
    modules.append(
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    )
    (model_dir / "modules.json").write_text(json.dumps(modules))
    with hermes_ort.load(model_dir) as model, pytest.raises(InputError, match="lists Dense"):
        model.embed(["hello"])


def test_embed_needs_an_encoder(tmp_path):
    pytest.importorskip("torch", reason="exporting needs torch")
    assert fx.export_cli(tmp_path / "gpt2", "--preset", "tiny-gpt2") == 0
    with hermes_ort.load(tmp_path / "gpt2") as model, pytest.raises(InputError) as e:
        model.embed(["hello"])
    assert (
        "is a decoder (text-generation-with-past): embed needs an encoder exported for "
        "feature-extraction" in str(e.value)
    )
    r = hermes("embed", str(tmp_path / "gpt2"), "--text", "hello")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "embed needs an encoder" in r.stderr


@pytest.mark.parametrize(
    "texts,words",
    [([], "a non-empty list"), ([1, 2], "every item as a str"), ("", None)],
    ids=["empty", "not-text", "empty-string"],
)
def test_bad_texts_are_named(minilm, texts, words):
    with hermes_ort.load(minilm[1]) as model:
        if words is None:  # an empty text is a text: [CLS] [SEP]
            assert model.embed(texts).shape == (1, 384)
            return
        with pytest.raises(InputError, match=words):
            model.embed(texts)


def hermes(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hermes_ort", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_prints_embeddings_and_their_similarities(minilm, reference, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES[1:3]) + "\n\n")  # a blank line is no text
    saved = tmp_path / "e.npy"
    args = ["embed", str(minilm[1]), "--text", SENTENCES[0], "--file", str(texts)]
    r = hermes(*args, "--save", str(saved))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == (
        "3 embeddings of 384 dimensions: mean pooling, normalized (1_Pooling/config.json)"
    )
    for i, line in enumerate(lines[1:4]):
        assert (
            line.startswith(f"[{i}] ")
            and "norm 1.0000" in line
            and json.dumps(SENTENCES[i], ensure_ascii=False) in line
        )
    assert lines[4] == "cosine similarity:"
    sims = np.array([[float(x) for x in line.split()[1:]] for line in lines[6:9]])
    ref = reference[:3] / np.linalg.norm(reference[:3], axis=1, keepdims=True)
    np.testing.assert_allclose(sims, ref @ ref.T, atol=1e-4)  # printed to 4 decimals
    assert "texts/s" in r.stderr and "peak RSS" in r.stderr
    assert (cosines(np.load(saved), reference[:3]) >= COSINE_FLOOR).all()
    r = hermes(*args, "--json", "--no-normalize")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["texts"] == SENTENCES[:3] and record["dimensions"] == 384
    assert record["pooling"] == ["mean"] and record["normalized"] is False
    got = np.array(record["embeddings"], np.float32)
    assert (cosines(got, reference[:3]) >= COSINE_FLOOR).all()
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


def test_cli_without_texts_is_one_line(minilm):
    r = hermes("embed", str(minilm[1]))
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "hermes-ort: error: give the texts to embed: --text TEXT (repeatable) or --file FILE"
    )
