"""Integrity of a model directory: every file a block opens is where the manifest says, inside the
model directory, of the size it says (checked before every load) and, with verify="once" (the
default), has the sha256 it says: hashed once, before its first use, then trusted while its
size, times and inode stay the same (by the model's Verifier, and across processes through
`verified.json` beside the manifest, or in the user's cache directory when the model directory is
read-only). A file whose stat changes after it was verified is hashed again before its next use.

The stat key has the ctime (set by the kernel on any write or utime, so `touch -r` after an edit
does not fool it) and the inode (a file replaced by another). Like git's index, a file changed
within RACY_NS before its hashing is not trusted from the cache: a write in the same clock tick
would leave its ctime unchanged. `verified.json` is read as JSON only; it guards against damage, not
against someone who can write the model directory (they can rewrite the manifest's hashes too)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from hermes_ort.core.choices import VerifyMode
from hermes_ort.core.errors import IntegrityError
from hermes_ort.core.manifest import MANIFEST_NAME, FileSpec
from hermes_ort.streaming.external_data import WireError, external_locations

CACHE_NAME = "verified.json"
CACHE_KIND = "hermes-ort-verified"
CACHE_SCHEMA = 1
RACY_NS = 2_000_000_000  # file-system clocks tick coarsely (a jiffy on ext4; 2 s on FAT)
_HASH_CHUNK = 1 << 20
_MEMORY_TAG = "*/_ORT_MEM_ADDR_/*"  # ORT reads such a "location" from a memory address


@dataclass(frozen=True)
class Verified:
    """A file whose bytes hashed to `sha256` when it had this stat."""

    sha256: str
    bytes: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    hashed_at_ns: int  # wall clock when hashing began

    def trusted(self, st: os.stat_result, sha256: str, racy_ns: int = RACY_NS) -> bool:
        return (
            self.sha256 == sha256
            and (self.bytes, self.mtime_ns, self.ctime_ns, self.ino, self.dev)
            == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
            # the ctime, not the mtime: the kernel sets it from this machine's clock on every
            # write; an mtime may come from another machine (tar, cp -p), even from the future
            and self.hashed_at_ns - st.st_ctime_ns >= racy_ns
        )


def resolve_inside(model_dir: Path, relative: str) -> Path:
    """The absolute path of a manifest path, refusing anything (symlinks included) that escapes."""
    root = Path(model_dir).resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise IntegrityError(
            f"'{relative}' resolves to '{path}', outside the model directory '{root}'"
        )
    return path


def _stat(model_dir: Path, spec: FileSpec) -> tuple[Path, os.stat_result]:
    path = resolve_inside(model_dir, spec.path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise IntegrityError(f"model file '{spec.path}' is missing from '{model_dir}'") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would hang or feed ORT anything
        raise IntegrityError(f"model file '{spec.path}' in '{model_dir}' is not a regular file")
    if st.st_size != spec.bytes:
        raise IntegrityError(
            f"model file '{spec.path}' has {st.st_size} bytes, the manifest says {spec.bytes} "
            f"(truncated or replaced?)"
        )
    return path, st


def check_size(model_dir: Path, spec: FileSpec) -> Path:
    """Cheap check done before every load: the file exists and has the manifest's size."""
    return _stat(model_dir, spec)[0]


def sha256_file(path: str | Path) -> str:
    import hashlib  # lazily: it loads OpenSSL, ~3.7 MB of resident memory

    digest = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def model_root(onnx_path: Path) -> Path:
    """The model directory holding an ONNX file: its nearest ancestor with a manifest (else its own
    directory, where ORT itself confines external data)."""
    for parent in Path(onnx_path).absolute().parents:
        if (parent / MANIFEST_NAME).is_file():
            return parent.resolve()
    return Path(onnx_path).absolute().parent.resolve()


def check_external_data(onnx_path: Path, allowed: list[Path] | None = None) -> None:
    """Refuse, before ORT opens it, an ONNX file whose tensors' external data `location`s point
    outside its model directory, at anything but a regular file, or (given `allowed`, the files
    the manifest lists for it) at a file the manifest does not list, so hashes cover all ORT
    reads."""
    onnx_path = Path(onnx_path)
    resolved = None if allowed is None else frozenset(Path(p).resolve() for p in allowed)
    try:
        locations = external_locations(onnx_path)
    except (WireError, ValueError) as e:
        raise IntegrityError(
            f"'{onnx_path}' is not an ONNX file this runtime can check: {e}"
        ) from None
    root = model_root(onnx_path)
    for location in locations:
        where = f"'{onnx_path}' names external data '{location}'"
        if location == _MEMORY_TAG or "\0" in location or Path(location).is_absolute():
            raise IntegrityError(f"{where}: not a relative file path; refused")
        target = (onnx_path.parent / location).resolve()
        if root not in target.parents:
            raise IntegrityError(f"{where}, outside the model directory '{root}'; refused")
        if not target.is_file():
            raise IntegrityError(f"{where}, which is not a regular file in the model directory")
        if resolved is not None and target not in resolved:
            raise IntegrityError(
                f"{where}, which the manifest does not list among its files; refused"
            )


class Verifier:
    """What one opened model has verified: the hashes it saw (by resolved path) and the .onnx
    files whose external data passed, each keyed by the file's stat, so a streamed block's next
    opening costs a stat. Thread-safe (the loading agents share it)."""

    def __init__(
        self, model_dir: str | Path, mode: VerifyMode = VerifyMode.ONCE, racy_ns: int | None = None
    ):
        self.model_dir = Path(model_dir)
        self.mode = VerifyMode(mode)
        self.racy_ns = RACY_NS if racy_ns is None else racy_ns
        self.hashed: list[str] = []  # manifest paths hashed by this verifier, in order
        self._seen: dict[str, Verified] = {}
        self._passed: set[tuple] = set()
        self._lock = threading.Lock()

    def verify(self, specs: list[FileSpec]) -> None:
        """Before a model's first use: sizes always; with "once", the sha256 of every file not
        already verified (here, or in the persisted cache) with its current stat."""
        stats = [(spec, *_stat(self.model_dir, spec)) for spec in specs]
        if self.mode == VerifyMode.SIZE:
            return
        stored = _read_cache(self.model_dir)
        new = False
        for spec, path, st in stats:
            seen = self._seen.get(str(path))
            if seen is not None and seen.trusted(st, spec.sha256, self.racy_ns):
                continue
            entry = stored.get(spec.path)
            if entry is not None and entry.trusted(st, spec.sha256, self.racy_ns):
                with self._lock:
                    self._seen[str(path)] = entry
                continue
            entry = self._hash_and_record(path, st, spec)
            if entry.trusted(st, spec.sha256, self.racy_ns):  # not within RACY_NS of a write
                stored[spec.path] = entry
                new = True
        if new:
            _write_cache(self.model_dir, stored)

    def check(self, spec: FileSpec) -> Path:
        """Before every load: the size, and the sha256 again if this verifier verified the file
        and it has changed since (a file verified once is trusted only while it stays the same)."""
        path, st = _stat(self.model_dir, spec)
        seen = self._seen.get(str(path))
        if seen is not None and not seen.trusted(st, spec.sha256, self.racy_ns):
            self._hash_and_record(path, st, spec)
        return path

    def hash_now(self, spec: FileSpec) -> None:
        """Hash the file now, whatever any cache says (`hermes-ort info --verify`)."""
        path, st = _stat(self.model_dir, spec)
        self._hash_and_record(path, st, spec)

    def check_graph(self, onnx_path: Path, allowed: list[Path] | None = None) -> None:
        """check_external_data, once per file version however its paths are spelled."""
        st = os.stat(onnx_path)
        resolved = None if allowed is None else frozenset(Path(p).resolve() for p in allowed)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, resolved)
        if key in self._passed:
            return
        check_external_data(onnx_path, allowed)
        with self._lock:
            self._passed.add(key)

    def check_graphs(self, graphs: list[tuple[str, tuple[FileSpec, ...]]]) -> None:
        """Every (.onnx, its files) of a plan: files verified, then each graph's external data."""
        self.verify(list({f.path: f for _, files in graphs for f in files}.values()))
        for path, files in graphs:
            allowed = [resolve_inside(self.model_dir, f.path) for f in files]
            self.check_graph(resolve_inside(self.model_dir, path), allowed)

    def _hash_and_record(self, path: Path, st: os.stat_result, spec: FileSpec) -> Verified:
        started = time.time_ns()
        with self._lock:
            self.hashed.append(spec.path)
        if sha256_file(path) != spec.sha256:
            with self._lock:
                self._seen.pop(str(path), None)
            raise IntegrityError(
                f"model file '{spec.path}' does not match its sha256 in the manifest "
                f"(bytes changed or file swapped)"
            )
        entry = Verified(
            spec.sha256, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, started
        )
        with self._lock:
            self._seen[str(path)] = entry
        return entry


# -- the persisted cache -------------------------------------------------------------------------
def cache_path(model_dir: Path) -> Path:
    """verified.json beside the manifest; in the user's cache directory if that is read-only."""
    if os.access(model_dir, os.W_OK):
        return Path(model_dir) / CACHE_NAME
    root = str(Path(model_dir).resolve())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hermes-ort"
    return base / f"verified-{Path(root).name}-{zlib.crc32(root.encode()):08x}.json"


def _read_cache(model_dir: Path) -> dict[str, Verified]:
    """The persisted entries by manifest path; anything unreadable counts as empty."""
    try:
        data = json.loads(cache_path(model_dir).read_text())
        if data.get("kind") != CACHE_KIND or data.get("schema_version") != CACHE_SCHEMA:
            return {}
        return {str(k): Verified(**v) for k, v in data["files"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _write_cache(model_dir: Path, entries: dict[str, Verified]) -> None:
    """Best effort (a cache): merged with what another process wrote meanwhile, replaced
    atomically; a read-only or full disk only costs hashing again next time."""
    path = cache_path(model_dir)
    merged = {**_read_cache(model_dir), **entries}
    files = {k: asdict(v) for k, v in sorted(merged.items())}
    doc = {"kind": CACHE_KIND, "schema_version": CACHE_SCHEMA, "files": files}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_NAME}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, path)
        except OSError:
            os.unlink(tmp)
            raise
