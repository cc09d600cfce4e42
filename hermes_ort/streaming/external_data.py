"""The external data files an ONNX file names, read from its protobuf bytes without `onnx`.

ONNX Runtime opens every `location` of a tensor stored outside the .onnx, relative to the .onnx's
directory. The runtime may not import `onnx`, so this walks the protobuf wire format itself, along
the only message fields that can hold a tensor (listed in _SCHEMA, field numbers of onnx.proto;
tests/test_integrity.py checks them against onnx's own descriptors). It keeps every value of an
entry whose key is "location" (a superset of what a protobuf parser keeps), and refuses what it
cannot parse: the caller then refuses the file, never guesses."""

from __future__ import annotations

import mmap
from pathlib import Path

# message -> {field number: message} of the fields that lead to a TensorProto
_SCHEMA: dict[str, dict[int, str]] = {
    "ModelProto": {7: "GraphProto", 20: "TrainingInfoProto", 25: "FunctionProto"},
    "TrainingInfoProto": {1: "GraphProto", 2: "GraphProto"},
    "GraphProto": {1: "NodeProto", 5: "TensorProto", 15: "SparseTensorProto"},
    "FunctionProto": {7: "NodeProto", 11: "AttributeProto"},
    "NodeProto": {5: "AttributeProto"},
    "AttributeProto": {
        5: "TensorProto",
        6: "GraphProto",
        10: "TensorProto",
        11: "GraphProto",
        22: "SparseTensorProto",
        23: "SparseTensorProto",
    },
    "SparseTensorProto": {1: "TensorProto", 2: "TensorProto"},
    "TensorProto": {13: "StringStringEntryProto"},
}
_MAX_DEPTH = 64  # nested subgraphs; deeper is refused (and would be absurd)


class WireError(ValueError):
    """The bytes are not a protobuf message this parser can read."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """(field number, wire type, start, stop) of each field in buf[pos:end]; stop-start is the
    payload of length-delimited fields."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, stop = _varint(buf, pos, end)
            start = pos
        elif wire == 1 or wire == 5:
            start, stop = pos, pos + (8 if wire == 1 else 4)
        elif wire == 2:
            size, start = _varint(buf, pos, end)
            stop = start + size
        else:  # groups (3, 4) never appear in ONNX; refuse rather than skip them wrongly
            raise WireError(f"unsupported wire type {wire}")
        if stop > end:
            raise WireError("a field runs past the end of its message")
        yield number, wire, start, stop
        pos = stop


def _walk(buf, kind: str, pos: int, end: int, found: set[bytes], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise WireError("messages nested too deeply")
    if kind == "StringStringEntryProto":
        keys, values = [], []
        for number, wire, start, stop in _fields(buf, pos, end):
            if wire == 2 and number in (1, 2):
                (keys if number == 1 else values).append(bytes(buf[start:stop]))
        if b"location" in keys:
            found.update(values)
        return
    children = _SCHEMA[kind]
    for number, wire, start, stop in _fields(buf, pos, end):
        child = children.get(number)
        if child is not None and wire == 2:  # another wire type is an unknown field to protobuf
            _walk(buf, child, start, stop, found, depth + 1)


def locations_in_bytes(data: bytes | memoryview) -> tuple[str, ...]:
    """Every external data location named in a serialised ModelProto, sorted."""
    found: set[bytes] = set()
    _walk(data, "ModelProto", 0, len(data), found, 0)
    try:
        return tuple(sorted(v.decode("utf-8") for v in found))
    except UnicodeDecodeError:
        raise WireError("a location is not UTF-8") from None


def external_locations(path: str | Path) -> tuple[str, ...]:
    """Every external data location named in the ONNX file at `path` (mapped, so a large file
    with its weights inside costs only the pages of its field headers)."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise WireError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return locations_in_bytes(view)
            finally:
                view.release()
