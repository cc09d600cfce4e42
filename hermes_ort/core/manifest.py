"""The manifest: the one contract between the exporter and the runtime.

On disk it is `manifest.json` at the root of a model directory (schema below). In code it is a tree
of frozen dataclasses. Every path is relative to the model directory and must stay inside it.

    {
      "schema_version": 2,
      "name": "bert-base", "family": "bert", "task": "feature-extraction",
      "source": {"kind": "preset" | "checkpoint" | "hub", "name": "..."},
      "inputs":  [{"name": "input_ids", "dtype": "int64",
                   "shape": ["batch_size", "sequence_length"],
                   "sample": {"kind": "randint", "high": 30522}}],
      "outputs": [{"name": "last_hidden_state", "dtype": "float32", "shape": [...]}],
      "blocks": [{"name": "layer_00", "kind": "layers", "layers": [0],
                  "path": "blocks/layer_00.onnx",
                  "inputs": ["..."], "outputs": ["..."],
                  "files": [{"path": "blocks/layer_00.onnx", "bytes": 123, "sha256": "..."},
                            {"path": "blocks/layer_00.data", "bytes": 456, "sha256": "..."}]}],
      "full_model": {"path": "full/model_inline.onnx", "files": [...]},
      "full_model_mmap": {"path": "full/model.onnx", "files": [... "full/model.onnx_data"]},
      "sample": {"batch_size": 1, "sequence_length": 128},
      "verification": {"reference": "pytorch", "max_abs_diff": 1e-6, "tolerance": 1e-4},
      "versions": {"onnxruntime": "...", ...},
      "quantization": null | {"mode": "int4", "method": "nbits", "block_size": 32, ...}
                      | {"mode": "gguf", "method": "nbits", "types": {"Q4_1": "MatMulNBits ..."}},
      "head": null | {"asked": 3, "vocab_size": 1000, "input": "...", "output": "logits",
                      "blocks": ["head_00", ...], "ranges": [[0, 336], ...], "bytes": [...]}
    }

A decoder exported with --head-slices has its LM head in HEAD blocks after the epilogue (which
then ends at the head's input), one per vocabulary range, and a last EPILOGUE block `head_concat`
joining their outputs into `logits` (`head` says which is which; HeadSpec).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hermes_ort.core.choices import BlockKind, values
from hermes_ort.core.errors import ManifestError

SCHEMA_VERSION = 2  # 2: `quantization` (schema 1 directories still load: unquantized)
# `head` (--head-slices) is optional within schema 2: a reader that predates it refuses the
# blocks of kind "head" by name
READABLE_SCHEMAS = (1, 2)
MANIFEST_NAME = "manifest.json"
# the exporter's --quantize modes, and "gguf": a GGUF file's own blocks kept as they are
QUANTIZATION_MODES = ("int4", "int8", "gguf")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[int | str, ...]  # ints are fixed dims, strings are symbolic ("batch_size")
    # How to make a sample value for this input (inputs only): {"kind": "randint", "high": N},
    # {"kind": "ones"}, {"kind": "zeros"}, {"kind": "arange"} (along the last axis),
    # {"kind": "normal"}.
    sample: dict[str, Any] | None = None


@dataclass(frozen=True)
class FileSpec:
    path: str  # relative to the model directory
    bytes: int
    sha256: str


@dataclass(frozen=True)
class BlockSpec:
    name: str
    kind: BlockKind
    layers: tuple[int, ...]  # transformer layers inside (empty for prologue/epilogue)
    path: str  # the block's .onnx, relative to the model directory
    inputs: tuple[str, ...]  # tensor names consumed: model inputs or outputs of earlier blocks
    outputs: tuple[str, ...]  # tensor names produced for later blocks or as model outputs
    files: tuple[FileSpec, ...]  # every file the block opens (its .onnx first), shared ones too

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def is_own(self, f: FileSpec) -> bool:
        """The block's own file (`NAME.onnx`, `NAME.data`): no other block reads it, unlike the
        shared ones (`shared.data`: a tied embedding another block may look up sparsely)."""
        return Path(f.path).name.startswith(f"{self.name}.")


@dataclass(frozen=True)
class HeadSpec:
    """A decoder's LM head cut over the vocabulary (export --head-slices): HEAD block `blocks[k]`
    reads `input` [batch, positions, hidden] and writes the logits of token ids `ranges[k]`
    ([start, stop)) as `<output>.<block>`; the EPILOGUE block after them concatenates those
    along the last axis (then applies what followed the head op: a bias, a soft-cap) into
    `output`. All of them are position-wise."""

    asked: int | str  # the option given: a number of slices, or "auto"
    vocab_size: int
    input: str
    output: str
    blocks: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]
    # per slice: the weight bytes it reads; a tied table's slice reads only its rows of the
    # shared file its BlockSpec lists whole
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class FullModelSpec:
    path: str
    files: tuple[FileSpec, ...]

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


@dataclass(frozen=True)
class Manifest:
    name: str
    family: str
    task: str
    source: dict[str, Any]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    blocks: tuple[BlockSpec, ...]
    full_model: FullModelSpec | None  # one file as users get it (weights inside when < 2 GB)
    sample: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    full_model_mmap: FullModelSpec | None = None  # same weights in an external data file (mmap)
    # how the weights were quantized (hermes_ort/export/quantize.py: mode int4|int8, method
    # nbits|dynamic, block_size, accuracy_level, algorithm, embeddings, head_bits); None: fp32
    quantization: dict[str, Any] | None = None
    head: HeadSpec | None = None  # the LM head sliced over the vocabulary; None: in the epilogue
    schema_version: int = SCHEMA_VERSION

    @property
    def packed_weights(self) -> bool:
        """Whether its weights run only prepacked (MatMulNBits: unpacked, every run dequantizes
        the whole weight into fp32 and takes another kernel, docs/design.md §2.7)."""
        return (self.quantization or {}).get("method") == "nbits"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def num_layers(self) -> int:
        return sum(len(b.layers) for b in self.blocks)

    def block_files(self) -> dict[str, FileSpec]:
        """Every distinct file of every block, by path (a shared file appears once)."""
        return {f.path: f for b in self.blocks for f in b.files}

    def all_files(self) -> dict[str, FileSpec]:
        """Every file the manifest lists (blocks, whole-model files), by path, once each."""
        wholes = [w for w in (self.full_model, self.full_model_mmap) if w is not None]
        return {**self.block_files(), **{f.path: f for w in wholes for f in w.files}}

    @property
    def blocks_bytes(self) -> int:
        return sum(f.bytes for f in self.block_files().values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {"schema_version": data.pop("schema_version"), **data}

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def _require(data: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ManifestError(f"{where}: missing field '{key}'")
    value = data[key]
    if not isinstance(value, kind):
        raise ManifestError(f"{where}: field '{key}' has type {type(value).__name__}")
    return value


def _check_relative(path: str, where: str) -> str:
    """Refuse paths that are absolute or climb out of the model directory."""
    p = Path(path)
    if (
        not path
        or p.is_absolute()
        or path.startswith(("/", "\\"))
        or ".." in p.parts
        or "\0" in path  # every os call would raise ValueError on it
    ):
        raise ManifestError(
            f"{where}: path '{path}' must be relative and stay inside the model directory"
        )
    return path


def _tensor(data: Any, where: str) -> TensorSpec:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected an object")
    shape = _require(data, "shape", list, where)
    if not all(isinstance(d, (int, str)) for d in shape):
        raise ManifestError(f"{where}: shape entries must be ints or strings")
    return TensorSpec(
        name=_require(data, "name", str, where),
        dtype=_require(data, "dtype", str, where),
        shape=tuple(shape),
        sample=data.get("sample"),
    )


def _file(data: Any, where: str) -> FileSpec:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected an object")
    return FileSpec(
        path=_check_relative(_require(data, "path", str, where), where),
        bytes=_require(data, "bytes", int, where),
        sha256=_require(data, "sha256", str, where),
    )


def _block(data: Any, where: str) -> BlockSpec:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected an object")
    kind = _require(data, "kind", str, where)
    if kind not in values(BlockKind):
        kinds = ", ".join(values(BlockKind))
        raise ManifestError(f"{where}: unknown block kind '{kind}' (expected one of {kinds})")
    files = tuple(
        _file(f, f"{where}.files[{i}]") for i, f in enumerate(_require(data, "files", list, where))
    )
    path = _check_relative(_require(data, "path", str, where), where)
    if path not in {f.path for f in files}:
        raise ManifestError(f"{where}: its path '{path}' is not listed in its files")
    return BlockSpec(
        name=_require(data, "name", str, where),
        kind=BlockKind(kind),
        layers=tuple(_require(data, "layers", list, where)),
        path=path,
        inputs=tuple(_require(data, "inputs", list, where)),
        outputs=tuple(_require(data, "outputs", list, where)),
        files=files,
    )


def _full_model(data: Any, where: str) -> FullModelSpec | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected an object")
    files = _require(data, "files", list, where)
    return FullModelSpec(
        path=_check_relative(_require(data, "path", str, where), where),
        files=tuple(_file(f, f"{where}.files[{i}]") for i, f in enumerate(files)),
    )


def _quantization(data: Any, source: str) -> dict[str, Any] | None:
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("mode") not in QUANTIZATION_MODES:
        modes = ", ".join(QUANTIZATION_MODES)
        raise ManifestError(f"{source}: quantization must be null or name its mode ({modes})")
    return data


def _head(data: Any, blocks: tuple[BlockSpec, ...], where: str) -> HeadSpec | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected an object")
    ranges = _require(data, "ranges", list, where)
    if not all(isinstance(r, list) and [type(v) for v in r] == [int, int] for r in ranges):
        raise ManifestError(f"{where}: ranges must be [start, stop] pairs of ints")
    head = HeadSpec(
        asked=_require(data, "asked", (int, str), where),
        vocab_size=_require(data, "vocab_size", int, where),
        input=_require(data, "input", str, where),
        output=_require(data, "output", str, where),
        blocks=tuple(_require(data, "blocks", list, where)),
        ranges=tuple((start, stop) for start, stop in ranges),
        bytes=tuple(_require(data, "bytes", list, where)),
    )
    stops = [0] + [stop for _, stop in head.ranges]
    if [start for start, _ in head.ranges] != stops[:-1] or stops[-1] != head.vocab_size:
        raise ManifestError(f"{where}: ranges {head.ranges} do not cover 0 .. {head.vocab_size}")
    kinds = {b.name: b.kind for b in blocks}
    if len(head.blocks) != len(head.ranges) or len(head.bytes) != len(head.ranges):
        raise ManifestError(f"{where}: blocks, ranges and bytes differ in length")
    if any(kinds.get(name) != BlockKind.HEAD for name in head.blocks):
        raise ManifestError(f"{where}: blocks {list(head.blocks)} are not all head blocks")
    return head


def parse_manifest(data: Any, source: str = MANIFEST_NAME) -> Manifest:
    """Validate a decoded manifest.json; every problem raises ManifestError naming the field."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a JSON object at the top level")
    version = data.get("schema_version")
    if version not in READABLE_SCHEMAS:
        raise ManifestError(
            f"{source}: unsupported schema_version {version!r} "
            f"(this hermes-ort reads {', '.join(map(str, READABLE_SCHEMAS))})"
        )
    blocks = tuple(
        _block(b, f"{source}: blocks[{i}]")
        for i, b in enumerate(_require(data, "blocks", list, source))
    )
    if not blocks:
        raise ManifestError(f"{source}: no blocks")
    full_model = _full_model(data.get("full_model"), f"{source}: full_model")
    full_model_mmap = _full_model(data.get("full_model_mmap"), f"{source}: full_model_mmap")
    manifest = Manifest(
        name=_require(data, "name", str, source),
        family=_require(data, "family", str, source),
        task=_require(data, "task", str, source),
        source=_require(data, "source", dict, source),
        inputs=tuple(
            _tensor(t, f"{source}: inputs[{i}]")
            for i, t in enumerate(_require(data, "inputs", list, source))
        ),
        outputs=tuple(
            _tensor(t, f"{source}: outputs[{i}]")
            for i, t in enumerate(_require(data, "outputs", list, source))
        ),
        blocks=blocks,
        full_model=full_model,
        full_model_mmap=full_model_mmap,
        sample=data.get("sample", {}),
        verification=data.get("verification", {}),
        versions=data.get("versions", {}),
        quantization=_quantization(data.get("quantization"), source),
        head=_head(data.get("head"), blocks, f"{source}: head"),
    )
    check_dataflow(manifest, source)
    return manifest


def check_dataflow(manifest: Manifest, source: str = MANIFEST_NAME) -> None:
    """Every block input must be a model input or an output of an earlier block; every model output
    must be produced by some block."""
    available = set(manifest.input_names)
    for block in manifest.blocks:
        missing = [t for t in block.inputs if t not in available]
        if missing:
            raise ManifestError(
                f"{source}: block '{block.name}' consumes {missing} which no earlier block produces"
            )
        available.update(block.outputs)
    missing = [t for t in manifest.output_names if t not in available]
    if missing:
        raise ManifestError(f"{source}: model outputs {missing} are produced by no block")


def load_manifest(model_dir: str | Path) -> Manifest:
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if model_dir.is_file():
        raise ManifestError(f"'{model_dir}' is a file, not a model directory")
    if not model_dir.is_dir():
        raise ManifestError(f"model directory '{model_dir}' does not exist")
    if not path.is_file():
        raise ManifestError(
            f"'{path}' not found: is '{model_dir}' a model exported by `hermes-ort export`?"
        )
    root = model_dir.resolve()
    if root not in path.resolve().parents:
        raise ManifestError(
            f"'{path}' is a link to '{path.resolve()}', outside the model directory"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"'{path}' is not valid JSON: {e}") from None
    return parse_manifest(data, str(path))


def last_consumers(manifest: Manifest) -> dict[str, int]:
    """Tensor name -> index of the last block that reads it (len(blocks) for model outputs).

    The engine frees each intermediate tensor right after its last consumer has run."""
    last: dict[str, int] = {}
    for i, block in enumerate(manifest.blocks):
        for name in block.inputs:
            last[name] = i
    for name in manifest.output_names:
        last[name] = len(manifest.blocks)
    return last
