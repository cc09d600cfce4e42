"""Saved packed copies of blocks: a block's graph optimised and saved with the packed weights ONNX
Runtime made of it on this machine (session options `optimized_model_filepath`,
`session.optimized_model_external_initializers_file_name` and
`session.save_external_prepacked_constant_initializers`), in a per-machine cache; paged.py opens
them. ORT saves a packed copy only for weights written to external data, and `.ort` files ignore
the option.

- `save_packed(block.onnx, cache_dir)`: every weight in one external data file, each followed by
  its packed copy, recorded on the weight as `prepacked_N = "<OpType>+<hash>|offset;len;..."`.
  The copies depend on the CPU's kernel layout and ORT's version: both are in the cache key with
  the bytes of the block's files. Written in a temporary directory then renamed, with a record
  (packed.json: key, ORT version, CPU, each file's size and sha256): a crash never leaves a
  half-written copy under its key.
- `check_saved`: before opening one, its record and files checked (sizes, and sha256 once, cached
  by stat as a model's files are, streaming/integrity.py).
- `packed_copies`: where each copy lies in the .data file, read from the .onnx without `onnx`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import onnxruntime as ort

from hermes_ort.core.choices import VerifyMode
from hermes_ort.core.errors import IntegrityError, LoadError
from hermes_ort.core.manifest import FileSpec
from hermes_ort.core.settings import PREPACKED_STREAMING, SessionSettings
from hermes_ort.streaming.external_data import WireError, _fields, external_locations
from hermes_ort.streaming.integrity import Verifier, sha256_file
from hermes_ort.streaming.sessions import session_options

CACHE_FORMAT = 1  # bump when what a saved copy holds, or how it is keyed, changes
META_NAME = "packed.json"
META_KIND = "hermes-ort-packed"
_STALE_TEMP_S = 3600  # a temporary directory this old was left by a crash
_COPY = re.compile(r"^(?P<kernel>[^+|]+)\+(?P<hash>\d+)\|(?P<offset>\d+);(?P<bytes>\d+)(;|$)")


class PackedCopyError(LoadError):
    """A saved packed copy cannot be used: missing, damaged, made for another block, ORT version
    or CPU, or not adopted by ONNX Runtime."""


CACHE_ENV = "HERMES_ORT_PACKED_CACHE"  # the cache's directory, where the default will not do


def default_cache_dir() -> Path:
    """$HERMES_ORT_PACKED_CACHE, else ~/.cache/hermes-ort/packed (or under $XDG_CACHE_HOME):
    copies belong to this machine."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hermes-ort" / "packed"


def cache_problem(cache_dir: str | Path | None = None) -> str | None:
    """Why saved copies cannot be written to the cache (created if missing), or None: a file
    is made and removed there (permission bits alone do not tell, e.g. for root or a read-only
    mount)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=cache_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        why = e.strerror or str(e)
        return f"the packed-copy cache '{cache_dir}' is not writable ({why}; see ${CACHE_ENV})"
    return None


# -- the key -------------------------------------------------------------------------------------
def cpu_fingerprint(cpuinfo: str | None = None) -> str:
    """A hash of what decides ORT's packed layouts: the architecture and the CPU's feature flags
    (x86 `flags`, arm `Features`) and identity (`CPU implementer`/`part`, `vendor_id`), over every
    core (big.LITTLE boards list two kinds)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = platform.processor()
    wanted = ("flags", "features", "cpu implementer", "cpu architecture", "cpu part", "vendor_id")
    facts = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in wanted:
            facts.add(f"{key.strip().lower()}={' '.join(sorted(value.split()))}")
    text = "\n".join([platform.machine(), *sorted(facts)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_hash_lock = threading.Lock()
_hashes: dict[tuple, str] = {}  # by stat: a file shared by many blocks is hashed once


def _sha256(path: Path) -> str:
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _hash_lock:
        known = _hashes.get(key)
    if known is None:
        known = sha256_file(path)
        with _hash_lock:
            _hashes[key] = known
    return known


def block_files(block_onnx: Path) -> list[Path]:
    """The block's .onnx and every external data file it names."""
    block_onnx = Path(block_onnx)
    try:
        names = external_locations(block_onnx)
    except (WireError, ValueError) as e:
        raise PackedCopyError(f"'{block_onnx}' is not an ONNX file: {e}") from None
    return [block_onnx, *(block_onnx.parent / n for n in names)]


def cache_key(
    block_onnx: str | Path,
    settings: SessionSettings = PREPACKED_STREAMING,
    file_sha256: dict[str, str] | None = None,
) -> str:
    """The key of a block's saved copy: its files' bytes (sha256, by file name; `file_sha256`
    gives known hashes, e.g. the manifest's, else each file is hashed), the optimisation level,
    ONNX Runtime's version and this CPU."""
    known = file_sha256 or {}
    parts = [f"format={CACHE_FORMAT}", f"ort={ort.__version__}", f"cpu={cpu_fingerprint()}"]
    parts.append(f"optimization={settings.optimization}")
    for i, path in enumerate(block_files(Path(block_onnx))):
        role = "graph" if i == 0 else f"data:{path.name}"
        parts.append(f"{role}={known.get(path.name) or _sha256(path)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def packed_dir(block_onnx: str | Path, cache_dir: str | Path, key: str) -> Path:
    """Where the saved copy of a block with this key lives."""
    return Path(cache_dir) / f"{Path(block_onnx).stem}-{key}"


# -- saving --------------------------------------------------------------------------------------
def save_packed(
    block_onnx: str | Path,
    cache_dir: str | Path | None = None,
    threads: int = 0,
    settings: SessionSettings = PREPACKED_STREAMING,
    file_sha256: dict[str, str] | None = None,
) -> Path:
    """The saved copy (its .onnx) of a block, made now unless the cache holds one already: the
    block's graph optimised at `settings.optimization`, every weight in one external data file
    followed by the packed copies ORT made of it on this machine."""
    block_onnx = Path(block_onnx)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(block_onnx, settings, file_sha256)
    final = packed_dir(block_onnx, cache_dir, key)
    onnx_name, data_name = f"{block_onnx.stem}.onnx", f"{block_onnx.stem}.data"
    if (final / META_NAME).is_file():
        return final / onnx_name
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(cache_dir, block_onnx.stem)
    tmp = Path(tempfile.mkdtemp(prefix=f".{block_onnx.stem}-{key}.", suffix=".tmp", dir=cache_dir))
    try:
        opts = session_options(replace(settings, prepack=True, threads=threads))
        opts.optimized_model_filepath = str(tmp / onnx_name)
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", data_name
        )
        opts.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        t0 = time.perf_counter()
        try:
            session = ort.InferenceSession(
                str(block_onnx), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # ORT's own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PackedCopyError(f"cannot save the packed copy of '{block_onnx}': {first}") from e
        del session
        save_s = time.perf_counter() - t0
        files = [tmp / onnx_name, tmp / data_name]
        if not files[1].is_file():  # every weight under the inline size: nothing to page
            files[1].write_bytes(b"")
        for f in files:
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        meta = {
            "kind": META_KIND,
            "schema_version": CACHE_FORMAT,
            "key": key,
            "source": str(block_onnx.resolve()),
            "onnxruntime": ort.__version__,
            "cpu": cpu_fingerprint(),
            "optimization": settings.optimization,
            "save_s": save_s,
            "files": [
                {"path": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files
            ],
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
        _fsync_dir(tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if another process saved it meanwhile
        except OSError as e:
            if not (final / META_NAME).is_file():
                raise PackedCopyError(
                    f"cannot save the packed copy of '{block_onnx}' as '{final}': {e} "
                    f"(delete '{final}' if a broken copy sits there)"
                ) from e
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final / onnx_name


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_temps(cache_dir: Path, stem: str) -> None:
    """Temporary directories a crashed save left (old enough that no save is still writing)."""
    now = time.time()
    for tmp in cache_dir.glob(f".{stem}-*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(tmp, ignore_errors=True)


# -- the saved copy's contents -------------------------------------------------------------------
@dataclass(frozen=True)
class PackedCopy:
    """One packed copy in the .data file: of weight `tensor`, made by kernel `kernel`."""

    tensor: str
    kernel: str
    offset: int
    bytes: int


def packed_copies(saved_onnx: str | Path) -> tuple[PackedCopy, ...]:
    """The packed copies a saved .onnx records (each weight's `prepacked_N` external data entry:
    "<OpType>+<hash>|<offset>;<bytes>;..."), read from its protobuf without `onnx`."""
    buf = Path(saved_onnx).read_bytes()
    copies = []
    try:
        for number, wire, start, stop in _fields(buf, 0, len(buf)):
            if number != 7 or wire != 2:  # ModelProto.graph
                continue
            for n2, w2, s2, e2 in _fields(buf, start, stop):
                if n2 != 5 or w2 != 2:  # GraphProto.initializer
                    continue
                name, entries = "", []
                for n3, w3, s3, e3 in _fields(buf, s2, e2):
                    if n3 == 8 and w3 == 2:  # TensorProto.name
                        name = bytes(buf[s3:e3]).decode("utf-8", "replace")
                    elif n3 == 13 and w3 == 2:  # TensorProto.external_data
                        kv = {n4: bytes(buf[s4:e4]) for n4, w4, s4, e4 in _fields(buf, s3, e3)}
                        entries.append((kv.get(1, b""), kv.get(2, b"")))
                for k, v in entries:
                    if not k.startswith(b"prepacked_"):
                        continue
                    m = _COPY.match(v.decode("utf-8", "replace"))
                    if m is None:
                        raise WireError(f"unreadable packed copy entry {v!r} on '{name}'")
                    copies.append(PackedCopy(name, m["kernel"], int(m["offset"]), int(m["bytes"])))
    except WireError as e:
        raise PackedCopyError(f"'{saved_onnx}' is not a saved packed copy: {e}") from None
    return tuple(copies)


def _read_meta(saved_onnx: Path) -> dict:
    path = saved_onnx.parent / META_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PackedCopyError(
            f"saved packed copy '{saved_onnx}' has no readable {META_NAME} ({e}): not a "
            f"finished save; delete '{saved_onnx.parent}' and save it again"
        ) from None
    if not isinstance(meta, dict) or meta.get("kind") != META_KIND:
        raise PackedCopyError(f"'{path}' is not a hermes-ort packed copy record")
    return meta


def check_saved(saved_onnx: str | Path, verify: VerifyMode = VerifyMode.ONCE) -> dict:
    """The saved copy's record, once its files are checked: sizes (and with "once", their sha256,
    cached by stat as a model's files are) and that it was saved for this ORT and CPU."""
    saved_onnx = Path(saved_onnx)
    meta = _read_meta(saved_onnx)
    where = f"saved packed copy '{saved_onnx.parent}'"
    if meta.get("schema_version") != CACHE_FORMAT:
        raise PackedCopyError(
            f"{where} has format {meta.get('schema_version')}, not {CACHE_FORMAT}"
        )
    for what, now in (("onnxruntime", ort.__version__), ("cpu", cpu_fingerprint())):
        if meta.get(what) != now:
            raise PackedCopyError(
                f"{where} was made for {what} {meta.get(what)}, this is {now}: its packed layouts "
                f"may differ; save it again"
            )
    if not saved_onnx.parent.name.endswith(f"-{meta.get('key')}"):
        raise PackedCopyError(f"{where} records key {meta.get('key')}, not its directory's")
    try:
        specs = [FileSpec(f["path"], int(f["bytes"]), f["sha256"]) for f in meta["files"]]
        Verifier(saved_onnx.parent, VerifyMode(verify)).verify(specs)
    except IntegrityError as e:
        raise PackedCopyError(f"{where} is damaged: {e}; delete it and save it again") from None
    except (KeyError, TypeError, ValueError) as e:
        raise PackedCopyError(f"{where} has a malformed {META_NAME}: {e}") from None
    return meta
