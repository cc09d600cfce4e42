"""cgroup v1 groups for emulating a board: a hard memory cap (memory) and slow storage (blkio).

Every group is created inside this process's own group of that controller (the `memory:` /
`blkio:` line of /proc/self/cgroup), named hermes-TAG-PID-N, and always removed: by the `with`
block that made it, else at exit, else (SIGINT/SIGTERM) through `signals_raise`. A child joins a
group by writing its pid into `cgroup.procs` before it execs (see device.py)."""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "hermes-"
_live: set[Path] = set()  # groups made by this process and not yet removed
_counter = itertools.count()


def own_cgroup(controller: str, proc_cgroup: str | None = None) -> str | None:
    """This process's group path for a v1 controller, e.g. '/process_api/abc' (None: not listed)."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and controller in parts[1].split(","):
            return parts[2]
    return None


def mount_point(controller: str, mounts: str | None = None) -> Path | None:
    """Where the v1 hierarchy holding `controller` is mounted (None: not mounted)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup" and controller in fields[3].split(","):
            return Path(fields[1])
    return None


def controller_base(controller: str) -> tuple[Path | None, str]:
    """(this process's own group directory for `controller`, "") or (None, why not usable)."""
    if os.name != "posix" or os.geteuid() != 0:
        return None, "not root"
    mount = mount_point(controller)
    own = own_cgroup(controller)
    if mount is None or own is None:
        return None, f"no cgroup v1 '{controller}' controller mounted"
    base = mount / own.lstrip("/")
    if not (base / "cgroup.procs").is_file() or not os.access(base, os.W_OK):
        return None, f"cannot create groups in '{base}'"
    return base, ""


class Group:
    """One cgroup directory made by this process. Use as a context manager (removed at exit)."""

    def __init__(self, base: Path, tag: str):
        while True:
            path = base / f"{PREFIX}{tag}-{os.getpid()}-{next(_counter)}"
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        self.path = path
        _live.add(path)

    @property
    def procs_path(self) -> str:
        return str(self.path / "cgroup.procs")

    def write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self.read("cgroup.procs").split()]
        except OSError:
            return []

    def remove(self, timeout_s: float = 5.0) -> None:
        """Kill what is left inside (only our own child ever joins), then rmdir."""
        remove_group(self.path, timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def remove_group(path: Path, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            pids = []
        for pid in pids:  # our own child, still alive (an error or Ctrl-C cut its run short)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            path.rmdir()
            break
        except FileNotFoundError:
            break
        except OSError as e:  # EBUSY while the killed child exits
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    _live.discard(path)


def remove_all() -> None:
    """Remove every group this process made and still holds (atexit, signal handlers)."""
    for path in list(_live):
        with contextlib.suppress(OSError):
            remove_group(path)


atexit.register(remove_all)


@contextlib.contextmanager
def signals_raise():
    """SIGTERM and SIGHUP raise KeyboardInterrupt like SIGINT does, so `finally` blocks remove the
    groups; on the way out every group left is removed."""

    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        remove_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class MemoryStats:
    peak_bytes: int  # memory.max_usage_in_bytes: anonymous memory + page cache charged
    failcnt: int  # times the limit was hit (reclaim was needed)
    oom_kills: int  # processes the OOM killer killed inside the group


class MemoryGroup(Group):
    def __init__(self, base: Path, tag: str, limit_bytes: int | None = None):
        super().__init__(base, tag)
        if limit_bytes is not None:
            self.write("memory.limit_in_bytes", str(limit_bytes))
            if (self.path / "memory.memsw.limit_in_bytes").exists():  # no swapping around it
                self.write("memory.memsw.limit_in_bytes", str(limit_bytes))

    def stats(self) -> MemoryStats:
        oom = dict(
            line.split() for line in self.read("memory.oom_control").splitlines() if " " in line
        )
        return MemoryStats(
            peak_bytes=int(self.read("memory.max_usage_in_bytes")),
            failcnt=int(self.read("memory.failcnt")),
            oom_kills=int(oom.get("oom_kill", 0)),
        )


class BlkioGroup(Group):
    def __init__(self, base: Path, tag: str, disk: tuple[int, int], read_bytes_per_s: int | None):
        super().__init__(base, tag)
        self.disk = disk
        if read_bytes_per_s:
            self.write(
                "blkio.throttle.read_bps_device", f"{disk[0]}:{disk[1]} {int(read_bytes_per_s)}"
            )

    def read_bytes(self) -> int:
        """Bytes the group read from its disk."""
        want = f"{self.disk[0]}:{self.disk[1]}"
        for line in self.read("blkio.throttle.io_service_bytes").splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0] == want and fields[1] == "Read":
                return int(fields[2])
        return 0


def disk_of(path: str | Path) -> tuple[int, int] | None:
    """(major, minor) of the whole disk holding `path`, for blkio throttling; None if not found
    (tmpfs, network file systems)."""
    dev = os.stat(path).st_dev
    if os.major(dev) == 0:  # a virtual fs (overlay, ...): look at what is mounted there
        dev = _device_behind_mount(Path(path).resolve())
        if dev is None:
            return None
    return _whole_disk(os.major(dev), os.minor(dev))


def _whole_disk(major: int, minor: int) -> tuple[int, int] | None:
    sys_dir = Path(f"/sys/dev/block/{major}:{minor}")
    if not sys_dir.exists():
        return None
    if (sys_dir / "partition").exists():  # a partition: throttle its whole disk
        try:
            text = (sys_dir.resolve().parent / "dev").read_text()
            major, minor = (int(x) for x in text.split(":"))
        except (OSError, ValueError):
            return None
    return major, minor


def _device_behind_mount(path: Path) -> int | None:
    """The block device (dev_t) under the mount holding `path`: its source, or an overlay's upper
    directory's file system."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    best: tuple[str, list[str]] | None = None
    for line in lines:
        left, _, right = line.partition(" - ")
        point = left.split()[4]
        if (path == Path(point) or Path(point) in path.parents) and (
            best is None or len(point) > len(best[0])
        ):
            best = (point, right.split())
    if best is None or len(best[1]) < 2:
        return None
    fstype, source, options = best[1][0], best[1][1], (best[1][2:] or [""])[0]
    if fstype == "overlay":
        upper = next((o[9:] for o in options.split(",") if o.startswith("upperdir=")), None)
        dev = os.stat(upper).st_dev if upper and os.path.exists(upper) else 0
        return dev if os.major(dev) else None
    if source.startswith("/dev/") and os.path.exists(source):
        rdev = os.stat(source).st_rdev
        return rdev if os.major(rdev) else None
    return None
