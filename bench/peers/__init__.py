"""The peers: the tools a user could run instead of hermes-ort, side by side with it on the same
weights, the same emulated boards and the same cores (`python -m bench peers`).

Each peer runs in a fresh process (`python -m bench.peers.child ENGINE ...`, the runtime's child
protocol) that imports only its own library, prints one record with the same fields for every
engine (time to first token, each token's time, tokens/s, load time, its new token ids), and is
measured from outside the same way for every engine: the kernel's peak RSS of the child, its
memory cgroup's peak, the bytes its blkio group read, whether the cap killed it.

Decoders (a Llama-layout checkpoint): hermes-ort, llama.cpp (llama-cpp-python; GGUF f32, f16,
q8_0, q4_0; with its load-time repacking and without), onnxruntime-genai (its builder's fp32 and
int4 models), transformers (PyTorch eager), accelerate disk offload, AirLLM. Encoders (a BERT
checkpoint): hermes-ort, transformers, optimum's ORTModelForFeatureExtraction. A real model (a
GGUF as a package ships it, real.py): llama.cpp on the file and on its requantizations (q4_0,
q8_0), hermes-ort on its export of the file ("gguf": the file's quantized blocks kept).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Engine:
    name: str  # as in the tables
    kind: str  # "decoder" | "encoder"
    formats: tuple[str, ...]  # weight formats it runs here
    module: str  # the Python package it needs (None: always there)
    install: str  # how to get it
    about: str  # what it does with memory, in a sentence


ENGINES: dict[str, Engine] = {
    e.name: e
    for e in (
        Engine(
            "hermes-ort",
            "both",
            ("fp32", "int4", "int8", "gguf"),
            "onnxruntime",
            "this repository",
            "per-block sessions streamed by loading agents; the planner keeps what fits the "
            "budget resident and streams the rest, dropping its pages after use",
        ),
        Engine(
            "llama.cpp",
            "decoder",
            ("f32", "f16", "q8_0", "q4_0", "q4_1"),
            "llama_cpp",
            "make bench-peers (llama-cpp-python, built from source with the CPU's native flags)",
            "mmaps the GGUF file and lets the page cache hold what fits; repacks quantized "
            "weights at load into its CPU layout (a heap copy) unless told not to",
        ),
        Engine(
            "onnxruntime-genai",
            "decoder",
            ("fp32", "int4"),
            "onnxruntime_genai",
            "make bench-peers (onnxruntime-genai; its model builder in .venv-genai)",
            "one ONNX Runtime session of the builder's fused graph, weights loaded into memory",
        ),
        Engine(
            "transformers",
            "both",
            ("fp32",),
            "transformers",
            "pip install -e '.[export]'",
            "PyTorch eager; safetensors loaded into memory",
        ),
        Engine(
            "accelerate",
            "decoder",
            ("fp32",),
            "accelerate",
            "pip install -e '.[export]'",
            "transformers with device_map to disk: weights offloaded to numpy memmaps, "
            "loaded layer by layer at each forward",
        ),
        Engine(
            "airllm",
            "decoder",
            ("fp32",),
            "airllm",
            "make bench-peers (airllm)",
            "the checkpoint split into per-layer files once; each forward loads a layer, runs it, "
            "frees it",
        ),
        Engine(
            "optimum",
            "encoder",
            ("fp32",),
            "optimum.onnxruntime",
            "pip install -e '.[export]'",
            "optimum's ORTModelForFeatureExtraction: one ONNX Runtime session of the whole model",
        ),
    )
}


def installed(engine: Engine) -> str | None:
    """None when the engine can run here, else why not and how to install it."""
    import importlib.util

    try:
        found = importlib.util.find_spec(engine.module) is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return None
    return f"{engine.name} is not installed (no module '{engine.module}'): {engine.install}"
