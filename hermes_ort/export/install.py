"""The atomic install of a model directory: everything is written into a temporary directory next to
the output (`.NAME.tmp-PID-XXXX`) that is renamed into place only once complete; on any failure or
interrupt it is removed, and what an export killed outright left is removed by the next export of
the same output. A replaced model is swapped out (`.NAME.old-PID-XXXX`) and removed after."""

from __future__ import annotations

import errno
import glob
import os
import secrets
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hermes_ort.core.manifest import MANIFEST_NAME
from hermes_ort.export.errors import ExportError

DISK_FULL_BYTES = 1 << 20  # less free than this when an export fails: the disk filled up
T = TypeVar("T")


def install_atomically(out: Path, force: bool, build: Callable[[Path], T]) -> T:
    """`build(tmp)` writes the model into a fresh temporary directory; it becomes `out` only if
    `build` returns. Refuses to replace anything but a model directory (and that only with
    `force`)."""
    out = Path(out).absolute()
    remove_stale(out)
    check_out(out, force)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # the pid in the name: a later export can tell the leftovers of a killed one (remove_stale).
        # Named before it exists: a Ctrl-C or SIGTERM landing right after the mkdir still finds
        # it in `tmp` (with mkdtemp it could land before the assignment and leave it behind)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        result = build(tmp)
        _swap_in(tmp, out)
        return result
    except BaseException as e:
        _clear_frames(e)
        explained = _explained(e, out) if isinstance(e, (ExportError, OSError)) else e
        if explained is e:
            raise
        raise explained from e
    finally:
        if tmp is not None and tmp.exists():
            remove_tree(tmp)


def _clear_frames(e: BaseException) -> None:
    """Drop the locals of the failed stages' frames (of `e` and the errors it chains): they hold
    ORT sessions and mappings of files in the temporary directory, whose disk space would stay
    taken, deleted, for as long as anyone keeps the error."""
    todo, seen = [e], set()
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        todo += [err.__cause__, err.__context__]


def _explained(e: ExportError | OSError, out: Path) -> ExportError:
    """The failure as an ExportError; a full disk is named as such, whatever the writer said
    (ORT reports one as "Protobuf serialization failed", optimum as an export failure)."""
    try:
        free = shutil.disk_usage(out.parent).free  # before the temporary directory is removed
    except OSError:
        free = None
    full = isinstance(e, OSError) and e.errno == errno.ENOSPC
    if full or (free is not None and free < DISK_FULL_BYTES):
        return ExportError(
            f"no space left on the device holding '{out.parent}' ({free} bytes free) while "
            f"exporting: {e}; nothing was kept"
        )
    if isinstance(e, OSError):
        return ExportError(f"cannot write the export of '{out}': {e}; nothing was kept")
    return e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> None:
    """What an export of `out` that was killed outright (SIGKILL, the OOM killer) left beside it:
    its temporary directory is removed; the previous model it had swapped out is put back if
    nothing replaced it, else removed. Only leftovers of processes that no longer exist."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*-*"):
        kind, _, rest = path.name[len(out.name) + 2 :].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not (out.exists() or out.is_symlink()):
            os.rename(path, out)
        else:
            remove_tree(path)


def check_out(out: Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise ExportError(f"'{out}' already exists; pass --force to replace it")
    foreign = any(out.iterdir()) and not (out / MANIFEST_NAME).is_file() if out.is_dir() else True
    if out.is_symlink() or foreign:
        raise ExportError(
            f"'{out}' exists and is not a hermes-ort model directory; refusing to replace it"
        )


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is swapped out first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        remove_tree(old)


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        os.unlink(path)
