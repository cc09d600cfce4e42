"""`--model FILE.gguf` as an export's Source: a transformers model of the file's dequantized,
un-permuted float32 weights (the PyTorch reference, and what --dtype fp32 and --quantize export),
with the file itself (`Source.gguf`) for the weights kept as they are and the tokenizer files."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hermes_ort.export.errors import ExportError
from hermes_ort.export.gguf.reader import GGUFFile, config_of, open_gguf
from hermes_ort.export.gguf.tokenizer import generation_config, write_tokenizer_files
from hermes_ort.export.gguf.weights import GGUFWeights
from hermes_ort.export.logs import say
from hermes_ort.export.nbits import ACCURACY_INT8

# The as-is export's verification floor: the cosine of its logits with PyTorch's, whose model
# holds the same (dequantized, un-permuted) weights. Blocks run prepacked (the runtime) take int8
# activations in blocks of 32, as llama.cpp's CPU kernels take Q8 ones: on SmolLM2-135M Q4_1,
# 1 - 6.2e-4 on the verification text, 1 - 1.1e-3 on a chat prompt; the floor leaves 4.5 times
# that. The verification runs the blocks unpacked (fp32 compute): 1 - 2.6e-12. Broken graphs are
# far below: without the Q/K un-permutation 1 - 0.30, one layer's q_proj scrambled 1 - 0.033.
COSINE_FLOOR = 0.995


@dataclass(frozen=True)
class KeptQuantization:
    """The manifest's `quantization` record of a GGUF exported as is: what each GGML type became.
    The exporter quantizes nothing (quantize.quantize_model leaves mode "gguf" alone); the
    blocks hold MatMulNBits, so they open prepacked (method "nbits": Manifest.packed_weights)."""

    types: dict[str, str]  # GGML type -> what the blocks hold, e.g. "Q4_1": "MatMulNBits ..."
    file_type: str | None  # general.file_type, e.g. "MOSTLY_Q4_1"
    embedding: str | None  # the table's lookup when it is kept packed
    cosine_floor: float = COSINE_FLOOR
    accuracy_level: int = ACCURACY_INT8
    mode: str = "gguf"
    method: str = "nbits"

    def for_model(self, decoder: bool) -> KeptQuantization:
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GGUFModel:
    """What an export reads from the file beside the torch model: its weights as they are, its
    tokenizer."""

    file: GGUFFile
    weights: GGUFWeights

    def kept(self) -> KeptQuantization:
        embed = self.weights.packed_form("model.embed_tokens.weight")
        lookup = None if embed is None else f"GatherBlockQuantized {embed}"
        return KeptQuantization(self.weights.kept(), _file_type(self.file), lookup)

    def write_tokenizer(self, out: Path) -> list[str]:
        return write_tokenizer_files(self.file, out)


def _file_type(f: GGUFFile) -> str | None:
    from gguf import LlamaFileType

    value = f.field("general.file_type")
    try:
        return None if value is None else LlamaFileType(int(value)).name
    except ValueError:
        return str(value)


def open_gguf_source(path: Path) -> tuple[Any, str, dict[str, Any], GGUFModel]:
    """The GGUF file at `path` as (torch model, architecture, the manifest's source record, its
    own blocks and tokenizer); sources.py makes the Source of them."""
    f = open_gguf(path)
    config = config_of(f)
    weights = GGUFWeights(f, config)
    say(
        f"reading GGUF '{path.name}' ({f.architecture}, {_file_type(f)}, "
        f"{len(weights.names())} tensors): dequantizing to float32 for PyTorch"
    )
    model = torch_model(config, weights, generation_config(f))
    from importlib.metadata import version

    record = {"kind": "gguf", "path": str(path), "file_type": _file_type(f)}
    record["reader"] = f"gguf-py {version('gguf')}"
    return model, f.architecture, record, GGUFModel(f, weights)


def torch_model(config: dict[str, Any], weights: GGUFWeights, generation: dict[str, int]):
    """transformers' model of `config` holding the dequantized weights (no random init first)."""
    import torch
    import transformers
    from transformers.modeling_utils import no_init_weights

    cfg = transformers.AutoConfig.for_model(**config)
    with no_init_weights():
        model = getattr(transformers, config["architectures"][0])(cfg)
    state = {name: torch.from_numpy(weights.float32(name)) for name in weights.names()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = set(missing) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if missing or unexpected:
        raise ExportError(
            f"GGUF file '{weights.file.path}' does not hold a {config['model_type']} decoder's "
            f"tensors: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    model.generation_config = transformers.GenerationConfig(**generation)
    return model.to(torch.float32).eval()
