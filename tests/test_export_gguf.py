"""`hermes-ort export --model FILE.gguf` (hermes_ort/export/gguf/): a tiny GGUF written here the way
llama.cpp writes one (Q4_0, Q4_1, Q8_0 and F16 tensors, Q/K rows permuted, a byte-level BPE
tokenizer), exported as is (its blocks kept as MatMulNBits) and dequantized (--dtype fp32), against
its PyTorch twin; the real SmolLM2-135M-Instruct Q4_1 GGUF against transformers' own GGUF loading;
and the files and options refused, by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:  # tests/ on sys.path (pytest's default import mode) or tests/ as a package
    import export_fixtures as fx
    import gguf_fixtures as gf
    import real_models
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx
    from tests import gguf_fixtures as gf
    from tests import real_models

import hermes_ort

pytest.importorskip("torch", reason="exporting needs torch (not on the aarch64 board)")
pytest.importorskip("gguf", reason="gguf-py comes with the export extra")

ROOT = Path(__file__).resolve().parents[1]
# the as-is blocks run prepacked with int8 activations: their logits' cosine with PyTorch's on
# the same weights (SmolLM2: 1 - 6.2e-4 on the verification text, 1 - 1.1e-3 on the chat prompt),
# the export's own floor (gguf/source.py: broken graphs are at 0.97 and below)
INT8_COSINE = 0.995


# -- the tiny GGUF ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the GGUF file, the PyTorch model holding its dequantized weights)."""
    model = gf.tiny_decoder()
    path = gf.write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)
    return path, gf.dequantized_model(model)


@pytest.fixture(scope="module")
def as_is(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("as-is") / "m"
    assert fx.export_cli(out, "--model", str(tiny[0])) == 0
    return out


def _ops(model_dir: Path, block: str) -> list[str]:
    import onnx

    m = onnx.load(str(model_dir / "blocks" / f"{block}.onnx"), load_external_data=False)
    return [n.op_type for n in m.graph.node]


def test_the_as_is_export_keeps_each_ggml_type(as_is):
    q = hermes_ort.load_manifest(as_is).quantization
    assert q["mode"] == "gguf" and q["method"] == "nbits"  # MatMulNBits: opened prepacked
    assert q["types"] == {
        "F16": "float32 (from F16)",
        "F32": "float32",
        "Q4_0": "MatMulNBits 4-bit block 32",
        "Q4_1": "MatMulNBits 4-bit block 32 + offsets",
        "Q8_0": "MatMulNBits 8-bit block 32",
    }
    assert hermes_ort.load_manifest(as_is).packed_weights
    assert "GatherBlockQuantized" in _ops(as_is, "prologue")  # Q4_1 table, offsets added
    layer0, layer1 = _ops(as_is, "layer_00"), _ops(as_is, "layer_01")
    # layer 0: q Q4_0, k Q4_1, v Q8_0 (8-bit: cannot stack) -> three projections, all 7 packed;
    # layer 1: q/k/v Q4_1 -> one packed QKV, its F16 o_proj a float MatMul (+ offset MatMuls)
    assert layer0.count("MatMulNBits") == 7 and layer1.count("MatMulNBits") == 4
    assert layer1.count("MatMul") == 3  # o_proj, and the offset terms of QKV and up (Q4_1)
    assert _ops(as_is, "epilogue")[-1] == "MatMulNBits"  # the untied Q8_0 head


def test_the_as_is_export_computes_the_gguf_model(as_is, tiny):
    import torch

    v = hermes_ort.load_manifest(as_is).verification
    assert v["quantized"] == "gguf" and v["quality"]["cosine"] >= v["cosine_floor"] == INT8_COSINE
    with hermes_ort.load(as_is) as model:
        feed = model.sample_inputs(sequence_length=12, seed=4)
        got = model.run(feed)["logits"]  # prepacked: int8 activations
    with torch.no_grad():
        ids = torch.from_numpy(feed["input_ids"])
        want = tiny[1](input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    cos = float(got.ravel() @ want.ravel() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cos >= INT8_COSINE


def test_the_fp32_export_generates_the_gguf_models_tokens(tiny, tmp_path):
    import torch

    assert fx.export_cli(tmp_path / "m", "--model", str(tiny[0]), "--dtype", "fp32") == 0
    m = hermes_ort.load_manifest(tmp_path / "m")
    assert m.quantization is None and m.verification["blocks_max_relative_diff"] <= 1e-4
    prompt = [5, 17, 99, 3, 42, 7, 250, 11]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        want = tiny[1].generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
            do_sample=False, pad_token_id=2,
        )[0].numpy()  # fmt: skip
    with hermes_ort.load(tmp_path / "m") as model:
        np.testing.assert_array_equal(model.generate(prompt, 12, eos_token_id=[]), want)


def test_the_tokenizer_and_chat_template_come_from_the_gguf(as_is):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tokens, _ = gf.vocabulary()
    tok = Tokenizer.from_file(str(as_is / "tokenizer.json"))
    assert tok.encode(" the").ids == [tokens.index("Ġthe")]  # the merges apply
    assert tok.encode("<|im_end|>").ids == [2]  # a control token is special, and no BOS added
    config = json.loads((as_is / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        False,
    )
    assert json.loads((as_is / "generation_config.json").read_text())["eos_token_id"] == 2
    chat = AutoTokenizer.from_pretrained(as_is).apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "pre,pieces",
    [
        ("gpt-2", ["I", "'", "VE", "Ġ1234567"]),  # case-sensitive contractions, runs of digits
        ("smollm", ["I", "'", "VE", "Ġ", "1", "2", "3", "4", "5", "6", "7"]),  # digits alone
        ("llama-bpe", ["I", "'VE", "Ġ", "123", "456", "7"]),  # Llama 3: digits in threes
        ("qwen2", ["I", "'VE", "Ġ", "1", "2", "3", "4", "5", "6", "7"]),
    ],
)
def test_each_pre_tokenizer_splits_as_llama_cpp(pre, pieces):
    from hermes_ort.export.gguf.tokenizer import _pre_tokenizer

    assert [p for p, _ in _pre_tokenizer(pre).pre_tokenize_str("I'VE 1234567")] == pieces


@pytest.mark.parametrize("broken", ["no-unpermute", "scrambled-layer"])
def test_a_broken_graph_fails_verification(tiny, tmp_path, capsys, monkeypatch, broken):
    """The verification holds the blocks to PyTorch on the same weights: a graph that keeps
    llama.cpp's Q/K row order, or one layer's packed bytes scrambled, is refused."""
    from hermes_ort.export.gguf import weights
    from hermes_ort.export.gguf.ggml import to_nbits
    from hermes_ort.export.nbits import NBitsWeight

    packed = weights.GGUFWeights.packed

    def wrong(self, name):
        w = packed(self, name)
        if broken == "no-unpermute" and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = self.by_name[name]
            return to_nbits(t.tensor_type.name, t.data, *(int(d) for d in reversed(t.shape)))
        if broken == "scrambled-layer" and name == "model.layers.1.mlp.up_proj.weight":
            return NBitsWeight(15 - w.q, w.scales, w.offsets, w.bits, w.block_size)
        return w

    monkeypatch.setattr(weights.GGUFWeights, "packed", wrong)
    assert fx.export_cli(tmp_path / "m", "--model", str(tiny[0])) == 1
    assert "verification failed: the gguf model's 'logits'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_qwen2_gguf_keeps_its_rows_and_biases(tmp_path):
    """qwen2: q/k/v biases, and Q/K rows llama.cpp leaves in order (nothing to un-permute)."""
    import torch

    model = gf.tiny_decoder(arch="qwen2")
    path = gf.write_gguf(tmp_path / "qwen2.gguf", model, arch="qwen2")
    for extra in ([], ["--dtype", "fp32"]):  # each verified against PyTorch by the export
        assert fx.export_cli(tmp_path / f"m{len(extra)}", "--model", str(path), *extra) == 0
    assert hermes_ort.load_manifest(tmp_path / "m0").quantization["mode"] == "gguf"
    prompt = [5, 17, 99, 3, 42, 7]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        want = gf.dequantized_model(model).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
            do_sample=False, pad_token_id=2,
        )[0].numpy()  # fmt: skip
    with hermes_ort.load(tmp_path / "m2") as m:
        np.testing.assert_array_equal(m.generate(prompt, 8, eos_token_id=[]), want)


# -- files and options refused -------------------------------------------------------------------
def test_a_truncated_gguf_names_the_tensor(tiny, tmp_path, capsys):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny[0].read_bytes()[:60_000])
    assert fx.export_cli(tmp_path / "m", "--model", str(cut)) == 1
    err = capsys.readouterr().err
    assert f"GGUF file '{cut}' is truncated or damaged: tensor 'blk." in err
    assert "runs past the end of the file" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


def test_gguf_files_are_refused_before_torch_is_imported(tiny, tmp_path):
    other = gf.write_gguf(tmp_path / "gpt2.gguf", gf.tiny_decoder(), types={}, arch="gpt2")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny[0].read_bytes()[:60_000])
    script = (
        "import sys\n"
        "from hermes_ort.export.pipeline import ExportOptions, check_options\n"
        "for f in sys.argv[1:]:\n"
        "    try:\n"
        "        check_options(ExportOptions(out='unused', model=f))\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, e)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(other), str(cut)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = r.stdout.splitlines()
    assert lines[0] == (
        f"ExportError GGUF file '{other}': architecture 'gpt2' is not supported "
        "(supported: llama, qwen2)"
    )
    assert lines[1].startswith(f"ExportError GGUF file '{cut}' is truncated or damaged: tensor")
    assert lines[2] == "torch imported: False"


def test_a_directory_holding_one_gguf_is_a_model_and_two_are_refused(tiny, tmp_path, capsys):
    from hermes_ort.export.checkpoint import resolve_source

    folder = tmp_path / "ggufs"
    folder.mkdir()
    shutil.copy(tiny[0], folder / "a.gguf")
    assert resolve_source(str(folder)) == str((folder / "a.gguf").resolve())
    shutil.copy(tiny[0], folder / "b.gguf")
    assert fx.export_cli(tmp_path / "m", "--model", str(folder)) == 1
    assert "holds 2 GGUF files (a.gguf, b.gguf): give one as --model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dtype", "fp32", "--quantize", "int4"], "--dtype fp32 keeps every weight float32"),
        (["--graph", "optimum"], "--graph optimum needs --dtype fp32"),
        (["--streaming"], "--streaming reads safetensors checkpoints, not a GGUF file"),
        (["--opset", "14"], "which need opset >= 15: --opset 14 is too old"),
    ],
    ids=["fp32-and-quantize", "optimum-as-is", "streaming", "opset"],
)
def test_conflicting_options_are_named(tiny, tmp_path, capsys, args, message):
    folder = tmp_path / "gguf"  # (a directory: --streaming refuses a file before it looks)
    folder.mkdir()
    shutil.copy(tiny[0], folder)
    assert fx.export_cli(tmp_path / "m", "--model", str(folder), *args) == 1
    assert message in capsys.readouterr().err


# -- the real SmolLM2-135M-Instruct Q4_1 -----------------------------------------------------------
QUESTION = [{"role": "user", "content": "The capital of France is"}]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return real_models.smollm2_135m_instruct_gguf()


@pytest.fixture(scope="module")
def transformers_model(smollm2):
    """transformers' own GGUF loading (it dequantizes and un-permutes the file itself)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    return model.float().eval()


def _prompt(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)  # the files the export built from the GGUF
    return list(tok.apply_chat_template(QUESTION, add_generation_prompt=True))


def _greedy(model, prompt: list[int]) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _last_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_smollm2_tokenizer_is_the_ggufs(smollm2, tmp_path):
    """Our tokenizer.json against transformers' GGUF tokenizer (which adds a BOS the file says
    not to add and takes <|im_start|> as EOS: compared without special tokens)."""
    from transformers import AutoTokenizer

    from hermes_ort.export.gguf.reader import open_gguf
    from hermes_ort.export.gguf.tokenizer import write_tokenizer_files

    assert write_tokenizer_files(open_gguf(smollm2), tmp_path) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    ours = AutoTokenizer.from_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    for text in [
        "In 2024, π≈3.14159; x=12345 + 678.",
        "Réponds en français, s'il te plaît 😀",
        "def f(x):\n    return x**2  # comment",
        "<|im_start|>user\nHi<|im_end|>\n",
    ]:
        ids = ours(text, add_special_tokens=False)["input_ids"]
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == text
    special = (ours.bos_token, ours.eos_token, ours.pad_token)
    assert special == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert ours("x")["input_ids"] == ours("x", add_special_tokens=False)["input_ids"]  # no BOS


def test_smollm2_fp32_export_generates_transformers_tokens(smollm2, transformers_model, tmp_path):
    assert fx.export_cli(tmp_path / "m", "--model", str(smollm2), "--dtype", "fp32") == 0
    prompt = _prompt(tmp_path / "m")
    with hermes_ort.load(tmp_path / "m") as model:
        got = model.generate(prompt, NEW_TOKENS, eos_token_id=[])[len(prompt) :].tolist()
    assert got == _greedy(transformers_model, prompt)


def test_smollm2_as_is(smollm2, transformers_model, tmp_path):
    """The GGUF's own blocks: a quarter of the fp32 export on disk, the Q8_0 table stored once
    for the embedding and the head; greedy tokens equal transformers' on the same dequantized
    weights, or part where fp32's top two logits are closer than the int8 activations' error."""
    out = tmp_path / "m"
    assert fx.export_cli(out, "--model", str(smollm2)) == 0
    m = hermes_ort.load_manifest(out)
    assert m.quantization["types"] == {
        "F32": "float32",
        "Q4_1": "MatMulNBits 4-bit block 32 + offsets",
        "Q8_0": "MatMulNBits 8-bit block 32",
    }
    # the head over twice a layer's size: cut into vocabulary slices (--head-slices auto), each
    # reading its rows of the table the prologue looks up, in place
    heads = [b for b in m.blocks if b.kind == "head"]
    assert m.head is not None and len(heads) == len(m.head.blocks) >= 2
    shared = set(m.blocks[0].files) & set(heads[0].files)  # prologue, first head slice
    table = 49152 * 576  # Q8_0: one byte a weight
    assert [f.bytes >= table for f in shared] == [True]
    assert sum(m.head.bytes) >= table  # the slices read the whole table between them, once
    assert m.blocks_bytes < smollm2.stat().st_size * 1.4  # scales and offsets are float32
    prompt = _prompt(out)
    want = _greedy(transformers_model, prompt)
    with hermes_ort.load(out) as model:
        got = model.generate(prompt, NEW_TOKENS, eos_token_id=[])[len(prompt) :].tolist()
        feed = model.sample_inputs(sequence_length=len(prompt))
        feed.update(input_ids=np.array([prompt]), attention_mask=np.ones((1, len(prompt)), int))
        prompt_logits = model.run(feed)["logits"][0]
    # the int8 activations' error on the logits, measured on the prompt pass; the pass itself
    # held to the verification's bound (a broken graph is far below it: gguf/source.py)
    reference = _last_logits(transformers_model, prompt)
    error = float(np.abs(prompt_logits - reference).max())
    cosine = float(prompt_logits.ravel() @ reference.ravel())
    cosine /= float(np.linalg.norm(prompt_logits) * np.linalg.norm(reference))
    assert cosine >= INT8_COSINE, cosine
    if got != want:
        j = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        logits = _last_logits(transformers_model, prompt + want[:j])[-1]
        gap = float(logits[want[j]] - logits[got[j]])
        assert gap <= 2 * error, (j, got, want, gap, error)


def test_smollm2_truncated_names_the_tensor(smollm2, tmp_path, capsys):
    cut = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as f:
        cut.write_bytes(f.read(60_000_000))
    assert fx.export_cli(tmp_path / "m", "--model", str(cut)) == 1
    err = capsys.readouterr().err
    assert f"'{cut}' is truncated or damaged: tensor 'blk." in err, err


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_smollm2_quantized_keeps_its_perplexity(smollm2, transformers_model, tmp_path, quantize):
    """The exporter's default int4 and int8 on real weights, on real text it never saw
    (bench/data/eval.txt, 128-token windows led by BOS, as `python -m bench quality` scores it),
    through the kernels the runtime runs (prepacked, int8 activations): perplexity within the
    issue's floors of PyTorch fp32's on the same dequantized GGUF (int4 1.03x, int8 1.01x)."""
    import torch

    from bench.quality import TEXT, bos_id, score, windows
    from hermes_ort.generation.tokenizer import load_tokenizer

    out = tmp_path / quantize
    assert fx.export_cli(out, "--model", str(smollm2), "--quantize", quantize) == 0
    ids = load_tokenizer(out).encode(TEXT.read_text(), add_special_tokens=False)
    parts = windows(ids, bos_id(out), 128)
    with hermes_ort.load(out) as model:
        nll, counts, _ = score(model, parts)
    ours = float(np.exp(sum(nll) / sum(counts)))
    ref_nll = 0.0
    with torch.no_grad():
        for w in parts:
            logits = transformers_model(torch.from_numpy(w[None, :])).logits[0].double()
            log_probs = torch.log_softmax(logits[:-1], -1)
            ref_nll -= float(log_probs[torch.arange(len(w) - 1), torch.from_numpy(w[1:])].sum())
    fp32 = float(np.exp(ref_nll / sum(counts)))
    floor = {"int4": 1.03, "int8": 1.01}[quantize]
    assert ours / fp32 <= floor, (quantize, ours, fp32)
