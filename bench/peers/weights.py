"""The same weights for every engine, prepared once under models/peers/NAME/ (each step skipped
when its output is there). A preset's:

    ckpt/            the preset with seeded random weights, save_pretrained (fp32 safetensors),
                     a real tokenizer for decoders (tokenizer.py)
    reference.json   the prompt (32 random token ids) or encoder inputs; transformers' greedy
                     tokens on the prompt (every fp32/f16 row must reproduce them)
    hermes-fp32/     hermes-ort's export of ckpt/
    gguf/F.gguf      llama.cpp: its vendored converter (f32), then llama_model_quantize (f16,
                     q8_0, q4_0, q4_1)
    genai-P/         onnxruntime-genai's model builder (-p fp32 | int4 -e cpu), in .venv-genai
    airllm/          AirLLM's per-layer split of ckpt/ (it writes it on its first load)
    onnx/            optimum's export of ckpt/ (encoders: ORTModelForFeatureExtraction)

A real model's (real.py: a packaged GGUF, no checkpoint): gguf/ holds the file as shipped and
llama.cpp's requantizations of it, hermes-gguf/ hermes-ort's export of it.

Every heavy step runs in a child process (the parent stays small)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from bench import REPO, child_env
from hermes_ort.core.errors import ChildFailed
from hermes_ort.measure.fresh_process import require, run_child

PROMPT_TOKENS = 32
REFERENCE_TOKENS = 16  # transformers' greedy tokens kept; runs compare their first N
ENCODER_TOKENS = 128
LLAMA_CPP_VERSION = "0.3.36"
PEERS_DIR = REPO / ".peers"  # the llama-cpp-python sdist (its converter), not in git
GENAI_PYTHON = REPO / ".venv-genai" / "bin" / "python"
QUANT_TYPES = {"f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}  # llama_ftype: LLAMA_FTYPE_MOSTLY_*


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class PeerModel:
    preset: str  # a preset of hermes_ort/presets, or a real model (real.REAL_MODELS)
    root: Path

    @classmethod
    def named(cls, preset: str, models_dir: Path = REPO / "models" / "peers") -> PeerModel:
        return cls(preset, models_dir / preset)

    @property
    def real(self):
        """The real model (bench.peers.real.RealModel) this is, None for a preset."""
        from bench.peers.real import REAL_MODELS

        return REAL_MODELS.get(self.preset)

    @property
    def kind(self) -> str:
        if self.real:
            return "decoder"
        config = json.loads((REPO / "hermes_ort" / "presets" / f"{self.preset}.json").read_text())
        return "decoder" if config["task"] == "text-generation" else "encoder"

    @property
    def tensorwise(self) -> bool:
        """Too large to build as a torch model here: written tensor by tensor (tensorwise.py)."""
        if self.real:
            return False
        config = json.loads((REPO / "hermes_ort" / "presets" / f"{self.preset}.json").read_text())
        return "tensorwise_dtype" in config

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def reference(self) -> Path:
        return self.root / "reference.json"

    @property
    def share_base_bytes(self) -> int:
        """What a profile's share cap ("cold:50%") is a share of: a preset's fp32 checkpoint, a
        real model's GGUF file as shipped."""
        if self.real:
            return self.weights("llama.cpp", self.real.shipped).stat().st_size
        return sum(p.stat().st_size for p in self.ckpt.glob("*.safetensors"))

    def weights(self, engine: str, fmt: str) -> Path:
        """What `engine` opens for weight format `fmt`."""
        paths = {
            "hermes-ort": self.root / f"hermes-{fmt}",
            "llama.cpp": self.root / "gguf" / f"{fmt}.gguf",
            "onnxruntime-genai": self.root / f"genai-{fmt}",
            "airllm": self.ckpt,
            "optimum": self.root / "onnx",
        }
        return paths.get(engine, self.ckpt)

    def files(self, engine: str, fmt: str, variant: str = "") -> list[Path]:
        """Every file `engine` reads (for the page-cache state of a profile, and its size)."""
        if engine == "hermes-ort" and (self.weights(engine, fmt) / "manifest.json").is_file():
            from bench.models import model_files
            from hermes_ort.core.manifest import load_manifest

            d = self.weights(engine, fmt)
            strategy = variant if variant in ("full", "full-mmap") else "pipeload"
            return model_files(load_manifest(d), d, strategy)
        where = self.root / "airllm" if engine == "airllm" else self.weights(engine, fmt)
        if where.is_file():
            return [where]
        return sorted(p for p in where.rglob("*") if p.is_file()) if where.is_dir() else []


def _child(cmd: list[str], what: str, timeout_s: float = 7200) -> dict:
    return require(run_child(cmd, timeout_s, env=child_env()), what)


def checkpoint(model: PeerModel) -> None:
    if (model.ckpt / "config.json").is_file():
        return
    log(f"{model.preset}: writing a random-weight checkpoint to {model.ckpt}")
    preset = REPO / "hermes_ort" / "presets" / f"{model.preset}.json"
    if model.tensorwise:
        tmp = model.ckpt.with_name("ckpt.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "bench.peers.tensorwise", str(preset), str(tmp)]
        record = _child(cmd, "the checkpoint")
        from bench.peers.tokenizer import write_tokenizer

        write_tokenizer(tmp, record["vocab"])
        os.replace(tmp, model.ckpt)
        return
    code = (
        "import sys, json; from pathlib import Path; "
        "from hermes_ort.export.presets import build_random_model, load_preset; "
        "p = load_preset(sys.argv[1]); out = Path(sys.argv[2]); "
        "m = build_random_model(p, 0); m.save_pretrained(out, safe_serialization=True); "
        "print(json.dumps({'vocab': m.config.vocab_size}))"
    )
    tmp = model.ckpt.with_name("ckpt.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    record = _child([sys.executable, "-c", code, model.preset, str(tmp)], "the checkpoint")
    if model.kind == "decoder":
        from bench.peers.tokenizer import write_tokenizer

        write_tokenizer(tmp, record["vocab"])
    os.replace(tmp, model.ckpt)


def reference(model: PeerModel) -> None:
    """The prompt or inputs, and transformers' outputs on them (in a child)."""
    if model.reference.is_file():
        return
    import numpy as np

    config = json.loads((model.ckpt / "config.json").read_text())
    rng = np.random.default_rng(0)
    if model.kind == "decoder":
        doc = {"prompt_ids": rng.integers(3, config["vocab_size"], PROMPT_TOKENS).tolist()}
    else:
        ids = rng.integers(0, config["vocab_size"], (1, ENCODER_TOKENS)).tolist()
        ones = [[1] * ENCODER_TOKENS]
        doc = {"inputs": {"input_ids": ids, "attention_mask": ones, "token_type_ids": [[0] * 128]}}
    if model.tensorwise:  # 27 GB as fp32: no transformers run here; runs compare to each other
        doc["transformers"] = None
        model.reference.write_text(json.dumps(doc))
        return
    tmp = model.reference.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    log(f"{model.preset}: transformers' reference outputs")
    cmd = [
        sys.executable,
        "-m",
        "bench.peers.child",
        "transformers",
        str(model.ckpt),
        "--reference",
        str(tmp),
        "--kind",
        model.kind,
        "--new-tokens",
        str(REFERENCE_TOKENS),
    ]
    record = _child(cmd, "the reference run")
    doc["transformers"] = record.get("new_ids") or record.get("checksums")
    model.reference.write_text(json.dumps(doc))
    tmp.unlink()


# The accuracy floors of these random-weight checkpoints' quantized exports. A random deep network
# amplifies any perturbation of its weights: TinyLlama shapes reach logits cosine 0.996 with
# PyTorch fp32 at int8 (the same at MatMulNBits accuracy levels 1 and 4: the weights' rounding, not
# the activations') and 0.47 at int4, whose rounding steps are 16x coarser (llama.cpp's q4_0 of the
# same checkpoint shares no greedy token with fp32 either); the exporter's floors (0.999, 0.99)
# are for trained models. The measured cosines are in each manifest and the README.
RANDOM_WEIGHTS_FLOOR = {"int8": 0.99, "int4": 0.4}


def hermes(model: PeerModel, fmt: str = "fp32") -> None:
    out = model.weights("hermes-ort", fmt)
    if (out / "manifest.json").is_file():
        return
    log(f"{model.preset}: hermes-ort export ({fmt}) to {out}")
    cmd = [
        sys.executable,
        "-m",
        "hermes_ort.export",
        "--model",
        str(model.ckpt),
        "--out",
        str(out),
        "--quiet",
        "--full-model",  # hermes-ort:fp32:full opens it
    ]
    if fmt != "fp32":  # the exporter's defaults for the mode (hermes_ort/export/quantize.py)
        cmd += ["--quantize", fmt, "--accuracy-floor", str(RANDOM_WEIGHTS_FLOOR[fmt])]
    if model.tensorwise:  # layer by layer: the model never fits in memory as fp32
        cmd.append("--streaming")
    require(run_child(cmd, 7200, env=child_env()), "the hermes-ort export")


def llama_cpp_sources() -> Path:
    """The converter vendored by llama-cpp-python's sdist (with its own gguf-py)."""
    src = PEERS_DIR / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    converter = src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if converter.is_file() and (converter.parent / "conversion" / "__init__.py").is_file():
        return converter
    PEERS_DIR.mkdir(exist_ok=True)
    sdist = PEERS_DIR / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    if not sdist.is_file():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(PEERS_DIR),
            f"llama-cpp-python=={LLAMA_CPP_VERSION}",
        ]
        result = run_child(cmd, 1800)
        if result.returncode != 0:
            raise ChildFailed(f"cannot download llama-cpp-python's sdist: {result.error}")
    with tarfile.open(sdist) as tar:
        wanted = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")  # and its own gguf, models
        vendored = "/vendor/llama.cpp/"
        members = [
            m
            for m in tar.getmembers()
            if any(m.name.split(vendored, 1)[-1].startswith(w) for w in wanted)
            and vendored in m.name
        ]
        tar.extractall(PEERS_DIR, members=members, filter="data")
    return converter


def gguf(model: PeerModel, fmt: str) -> None:
    """llama.cpp's converter to a source GGUF, then `llama_model_quantize` to `fmt`. The source is
    f32, except for a tensorwise checkpoint (27 GB as f32, more than this disk holds beside it):
    the converter's own q8_0, re-quantized (q4_0 from q8_0 rounds twice; random weights anyway)."""
    out = model.weights("llama.cpp", fmt)
    if out.is_file():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    source_fmt = "q8_0" if model.tensorwise else "f32"
    source = model.weights("llama.cpp", source_fmt)
    if not source.is_file():
        log(f"{model.preset}: GGUF {source_fmt} with llama.cpp's converter")
        converter = llama_cpp_sources()
        tmp = source.with_suffix(".tmp")
        cmd = [
            sys.executable,
            str(converter),
            str(model.ckpt),
            "--outtype",
            source_fmt,
            "--outfile",
            str(tmp),
        ]
        result = run_child(cmd, 7200, env=child_env())
        if result.returncode != 0:
            raise ChildFailed(f"llama.cpp's converter failed: {result.error}")
        os.replace(tmp, source)
    if fmt == source_fmt:
        return
    log(f"{model.preset}: GGUF {fmt} from {source_fmt} with llama_model_quantize")
    quantize(source, out, fmt, requantize=source_fmt != "f32")


def quantize(source: Path, out: Path, fmt: str, requantize: bool) -> None:
    """llama.cpp's own quantizer (`llama_model_quantize`, default parameters) from `source` to
    `fmt`, in a child; `requantize`: the source is quantized already (allow_requantize)."""
    code = (
        "import sys, json, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
        "p.ftype = int(sys.argv[3]); p.nthread = 2; p.allow_requantize = sys.argv[4] == '1'; "
        "r = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p); "
        "print(json.dumps({'ok': r == 0, 'error': f'status {r}'}))"
    )
    tmp = out.with_suffix(".tmp")
    flag = "1" if requantize else "0"
    cmd = [sys.executable, "-c", code, str(source), str(tmp), str(QUANT_TYPES[fmt]), flag]
    _child(cmd, f"quantize {fmt}")
    os.replace(tmp, out)


def genai(model: PeerModel, fmt: str) -> None:
    out = model.weights("onnxruntime-genai", fmt)
    if (out / "genai_config.json").is_file():
        return
    if not GENAI_PYTHON.is_file():
        raise ChildFailed(f"onnxruntime-genai's builder needs {GENAI_PYTHON}: make bench-peers")
    log(f"{model.preset}: onnxruntime-genai's builder ({fmt}) to {out}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cache = model.root / ".genai-cache"
    cmd = [
        str(GENAI_PYTHON),
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(model.ckpt),
        "-o",
        str(tmp),
        "-p",
        fmt,
        "-e",
        "cpu",
        "-c",
        str(cache),
    ]
    result = run_child(cmd, 7200)
    if result.returncode != 0:
        raise ChildFailed(f"onnxruntime-genai's builder failed: {result.error}")
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, out)


def airllm(model: PeerModel) -> None:
    """AirLLM splits the checkpoint into per-layer files on its first load: done here, once."""
    shards = model.root / "airllm"
    if shards.is_dir() and any(shards.rglob("*.safetensors")):
        return
    log(f"{model.preset}: AirLLM's layer split into {shards}")
    shards.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "bench.peers.child",
        "airllm",
        str(model.ckpt),
        "--reference",
        str(model.reference),
        "--new-tokens",
        "1",
        "--scratch",
        str(shards),
    ]
    _child(cmd, "AirLLM's split")


def onnx(model: PeerModel) -> None:
    out = model.weights("optimum", "fp32")
    if (out / "model.onnx").is_file():
        return
    log(f"{model.preset}: optimum's ONNX export to {out}")
    code = (
        "import sys, json; from optimum.exporters.onnx import main_export; "
        "main_export(sys.argv[1], output=sys.argv[2], task='feature-extraction'); "
        "print(json.dumps({}))"
    )
    _child([sys.executable, "-c", code, str(model.ckpt), str(out)], "optimum's export")


def prepare(model: PeerModel, engine: str, fmt: str) -> Path:
    """Everything `engine` needs to run `fmt` of `model`; the weights it opens."""
    if model.real:
        from bench.peers.real import prepare_real

        return prepare_real(model, engine, fmt)
    checkpoint(model)
    reference(model)
    steps = {
        "hermes-ort": lambda: hermes(model, fmt),
        "llama.cpp": lambda: gguf(model, fmt),
        "onnxruntime-genai": lambda: genai(model, fmt),
        "airllm": lambda: airllm(model),
        "optimum": lambda: onnx(model),
    }
    steps.get(engine, lambda: None)()
    return model.weights(engine, fmt)
