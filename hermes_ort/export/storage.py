"""How blocks are stored (docs/design.md §2.1): each block is an .onnx optimised offline at ORT's
portable level, with its weights in an external data file that ORT mmaps.

- Optimisation: ORT_ENABLE_EXTENDED (fusions into contrib ops that exist on every CPU). Never
  ORT_ENABLE_ALL: its layout transforms (NCHWc) are x86-specific and would bake them into the file.
- Layout: tensors >= 1 KiB go to `blocks/<name>.data`, each at a 64 KiB-aligned offset (the gaps are
  seeked over, so the file is sparse); smaller ones stay inline in the .onnx.
- Sharing: a tensor (>= 64 KiB) whose bytes are identical in several blocks (GPT-2's tied
  embedding/head) is stored once in `blocks/shared.data`; every block using it lists that file.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import numpy_helper

from hermes_ort.core.manifest import FileSpec
from hermes_ort.export.errors import ExportError

ALIGN_BYTES = 64 * 1024
EXTERNAL_MIN_BYTES = 1024
SHARED_DATA = "shared.data"
# Smaller duplicates across blocks are stored per block (cheaper than one aligned slot), so that no
# block depends on a shared file for them.
SHARE_MIN_BYTES = ALIGN_BYTES
OPTIMIZATION_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
_HASH_CHUNK = 8 << 20


class TensorReader:
    """Bytes of initializers, inline or external (external files are mmapped once)."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def read(self, tensor: onnx.TensorProto, base_dir: Path) -> memoryview | bytes | None:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            path = (base_dir / info["location"]).resolve()
            if path not in self._maps:
                with open(path, "rb") as f:
                    self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            data = self._maps[path]
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else len(data) - offset
            return memoryview(data)[offset : offset + length]
        if tensor.HasField("raw_data"):
            return tensor.raw_data
        if tensor.data_type == onnx.TensorProto.STRING:
            return None
        return numpy_helper.to_array(tensor).tobytes()

    def close(self) -> None:
        for m in self._maps.values():
            with contextlib.suppress(BufferError):  # a view still points into it: the GC closes it
                m.close()
        self._maps.clear()


class DataWriter:
    """Appends tensors to a data file at aligned offsets and hashes the file as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._sha = hashlib.sha256()
        self._pos = 0

    def append(self, data: memoryview | bytes) -> tuple[int, int]:
        offset = -(-self._pos // ALIGN_BYTES) * ALIGN_BYTES
        if offset > self._pos:
            self._sha.update(bytes(offset - self._pos))  # the hole reads back as zeros
            self._file.seek(offset)
        self._file.write(data)
        self._sha.update(data)
        self._pos = offset + len(data)
        return offset, len(data)

    def close(self, root: Path) -> FileSpec:
        self._file.truncate(self._pos)
        self._file.close()
        return FileSpec(self.path.relative_to(root).as_posix(), self._pos, self._sha.hexdigest())


def _clear_data(tensor: onnx.TensorProto) -> None:
    for field in (
        "raw_data",
        "float_data",
        "int32_data",
        "int64_data",
        "double_data",
        "uint64_data",
    ):
        tensor.ClearField(field)


def point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    _clear_data(tensor)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def make_inline(tensor: onnx.TensorProto, data: memoryview | bytes) -> None:
    """Store `data` inside the graph (whether the tensor was external or inline before)."""
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    _clear_data(tensor)
    tensor.raw_data = bytes(data)


def save_with_data(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    """onnx's save with every tensor of 1 KiB or more in one data file beside `path` (a scratch
    copy for ORT's tools and the exporter's later stages, not the model directory's layout)."""
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )


def write_model(model: onnx.ModelProto, path: Path, root: Path) -> FileSpec:
    data = model.SerializeToString()
    path.write_bytes(data)
    return FileSpec(path.relative_to(root).as_posix(), len(data), hashlib.sha256(data).hexdigest())


def all_tensors(graph: onnx.GraphProto):
    """Initializers and tensor attributes (Constant values), subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from all_tensors(sub)


def write_external(
    model: onnx.ModelProto, src_dir: Path, onnx_path: Path, root: Path
) -> list[FileSpec]:
    """Write `model` (its tensors inline or external in `src_dir`) as `onnx_path` + `<name>_data`:
    tensors >= 1 KiB aligned in the data file, smaller ones inline. `model` then points there."""
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    reader = TensorReader()
    writer = DataWriter(onnx_path.with_name(onnx_path.name + "_data"))
    try:
        for tensor in all_tensors(model.graph):
            data = reader.read(tensor, src_dir)
            if data is None:
                continue
            if len(data) < EXTERNAL_MIN_BYTES:
                make_inline(tensor, data)
            else:
                point_to(tensor, writer.path.name, *writer.append(data))
            del data
    finally:
        data_spec = writer.close(root)
        reader.close()
    return [write_model(model, onnx_path, root), data_spec]


def optimise_block(src: Path, dst: Path) -> None:
    """ORT's portable optimisations, saved to `dst`, weights in `dst.bin` (read by store_blocks)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = OPTIMIZATION_LEVEL
    so.optimized_model_filepath = str(dst)
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", dst.stem + ".bin"
    )
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_MIN_BYTES)
    )
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(f"onnxruntime cannot optimise block '{src.stem}': {e}") from e


@dataclass(frozen=True)
class StoredBlock:
    name: str
    path: str  # the .onnx, relative to the model directory
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    files: tuple[FileSpec, ...]  # the .onnx first, then its own data, then shared.data


def _probe(data: memoryview | bytes) -> bytes:
    """A cheap fingerprint (head, middle, tail): it rules out most unequal tensors before a hash."""
    n = len(data)
    h = hashlib.blake2b(digest_size=16)
    for start in (0, n // 2, max(0, n - 4096)):
        h.update(data[start : start + 4096])
    return h.digest()


def store_blocks(
    optimised: list[tuple[str, Path]], blocks_dir: Path, root: Path
) -> list[StoredBlock]:
    """Lay out the optimised blocks: `blocks/<name>.onnx` + `<name>.data`; tensors >= 64 KiB whose
    bytes several blocks hold are stored once, in a shared file per set of blocks using them
    (`shared.data`, then `shared_01.data`, ...), so a block lists only shared bytes it reads."""
    blocks_dir.mkdir(parents=True, exist_ok=True)
    reader = TensorReader()
    try:
        models = [
            (name, onnx.load(str(p), load_external_data=False), p.parent) for name, p in optimised
        ]
        data = [[reader.read(t, base) for t in m.graph.initializer] for _, m, base in models]
        keys = _content_keys(models, data)
        users: dict[bytes, set[int]] = {}
        first: dict[bytes, tuple[int, int]] = {}
        for b, block_keys in enumerate(keys):
            for i, k in enumerate(block_keys):
                if k is not None and len(data[b][i]) >= SHARE_MIN_BYTES:
                    users.setdefault(k, set()).add(b)
                    first.setdefault(k, (b, i))
        groups: dict[frozenset, list[bytes]] = {}
        for k, bs in users.items():
            if len(bs) > 1:
                groups.setdefault(frozenset(bs), []).append(k)
        shared_at: dict[bytes, tuple[str, int, int]] = {}  # key -> (file name, offset, length)
        shared_specs: dict[str, FileSpec] = {}
        for n, group in enumerate(groups.values()):
            writer = DataWriter(blocks_dir / (SHARED_DATA if n == 0 else f"shared_{n:02d}.data"))
            for k in group:
                b, i = first[k]
                shared_at[k] = (writer.path.name, *writer.append(data[b][i]))
            shared_specs[writer.path.name] = writer.close(root)
        stored = [
            _store_one(name, model, data[b], keys[b], shared_at, shared_specs, blocks_dir, root)
            for b, (name, model, _) in enumerate(models)
        ]
        del data
        return stored
    finally:
        reader.close()


def _content_keys(models, data) -> list[list[bytes | None]]:
    """Per initializer: a key equal for equal bytes of one element type (None for tensors kept
    inline). Not the dims: a quantized tied table is MatMulNBits' B [V, K / bs, blob] in the head
    and the same bytes as [V, K * bits / 8] in the embedding's lookup, stored once."""
    by_probe: dict[tuple, list[tuple[int, int]]] = {}
    for b, (_, model, _) in enumerate(models):
        for i, t in enumerate(model.graph.initializer):
            d = data[b][i]
            if d is not None and len(d) >= EXTERNAL_MIN_BYTES:
                by_probe.setdefault((t.data_type, len(d), _probe(d)), []).append((b, i))
    keys: list[list[bytes | None]] = [[None] * len(d) for d in data]
    for n, ((dtype, _, _), members) in enumerate(by_probe.items()):
        for b, i in members:  # unique probes need no full hash
            keys[b][i] = (
                n.to_bytes(8, "little")
                if len(members) == 1
                else b"sha" + dtype.to_bytes(4, "little") + hashlib.sha256(data[b][i]).digest()
            )
    return keys


def _store_one(name, model, data, keys, shared_at, shared_specs, blocks_dir, root) -> StoredBlock:
    """Write one block: its own tensors to `<name>.data` (equal ones once), shared ones pointed
    to."""
    writer = None
    own_at: dict[bytes, tuple[int, int]] = {}
    shared_used: list[str] = []
    for i, tensor in enumerate(model.graph.initializer):
        k = keys[i]
        if k is None:
            if data[i] is not None:
                make_inline(tensor, data[i])
        elif k in shared_at:
            location, offset, length = shared_at[k]
            point_to(tensor, location, offset, length)
            if location not in shared_used:
                shared_used.append(location)
        else:
            if k not in own_at:
                writer = writer or DataWriter(blocks_dir / f"{name}.data")
                own_at[k] = writer.append(data[i])
            point_to(tensor, writer.path.name, *own_at[k])
    files = [write_model(model, blocks_dir / f"{name}.onnx", root)]
    if writer is not None:
        files.append(writer.close(root))
    files.extend(shared_specs[location] for location in sorted(shared_used))
    inits = {t.name for t in model.graph.initializer}
    return StoredBlock(
        name=name,
        path=files[0].path,
        inputs=tuple(v.name for v in model.graph.input if v.name not in inits),
        outputs=tuple(v.name for v in model.graph.output),
        files=tuple(files),
    )
