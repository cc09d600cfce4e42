"""Integrity of a model directory: every file a block opens is where the manifest says, of the
size it says, and (checked once, then cached by size and mtime) has the sha256 it says."""

from __future__ import annotations

import os
from pathlib import Path

from hermes_ort.errors import IntegrityError
from hermes_ort.manifest import FileSpec

_HASH_CHUNK = 8 << 20


def resolve_inside(model_dir: Path, relative: str) -> Path:
    """The absolute path of a manifest path, refusing anything (symlinks included) that escapes."""
    root = model_dir.resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise IntegrityError(
            f"'{relative}' resolves to '{path}', outside the model directory '{root}'"
        )
    return path


def check_size(model_dir: Path, spec: FileSpec) -> Path:
    """Cheap check done before every load: the file exists and has the manifest's size."""
    path = resolve_inside(model_dir, spec.path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise IntegrityError(f"block file '{spec.path}' is missing from '{model_dir}'") from None
    if size != spec.bytes:
        raise IntegrityError(
            f"block file '{spec.path}' has {size} bytes, the manifest says {spec.bytes} (truncated or replaced?)"
        )
    return path


def sha256_file(path: str | Path) -> str:
    import hashlib  # lazily: it loads OpenSSL, ~3.5 MB of resident memory

    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_hash(model_dir: Path, spec: FileSpec) -> None:
    path = check_size(model_dir, spec)
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise IntegrityError(
            f"block file '{spec.path}' does not match its sha256 in the manifest (damaged or swapped)"
        )
