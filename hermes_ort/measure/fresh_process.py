"""Fresh Python processes: peak memory is only comparable between configurations when each starts
from an empty process. One protocol, for calibration, the demo and every benchmark:

- the child ends with one JSON line on stdout: its record with "ok": true, or {"ok": false,
  "error": "Type: message"} and exit status 1 (`child_main`), never a traceback;
- the parent (`run_child`) starts it, kills it on timeout (or Ctrl-C), reaps it with the kernel's
  resource usage (its own peak RSS) and parses that last JSON line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hermes_ort.core.errors import ChildFailed


@dataclass(frozen=True)
class ChildResult:
    returncode: int  # negative: killed by that signal (-9: SIGKILL, the OOM killer's too)
    record: dict[str, Any]  # its last JSON line ({} if it printed none)
    stderr: str
    wall_s: float  # spawn to exit
    peak_rss_bytes: int  # the kernel's maxrss of the child (wait4), whatever it printed
    started_at: float  # time.time() at spawn
    timed_out: bool = False
    command: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.record.get("ok", True) is True

    @property
    def error(self) -> str:
        """Why it failed: its own one-line error, else its last line of stderr."""
        if self.timed_out:
            return f"timeout: killed after {self.wall_s:.0f} s"
        own = self.record.get("error")
        tail = (self.stderr.strip().splitlines() or [f"exit status {self.returncode}"])[-1]
        return own or tail


def last_json_line(text: str) -> dict[str, Any]:
    """The last line of `text` that is a JSON object ({} if none)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return {}


def run_child(
    cmd: Sequence[str],
    timeout_s: float = 1800,
    preexec_fn: Callable[[], None] | None = None,
    env: dict[str, str] | None = None,
) -> ChildResult:
    """Run `cmd` to its end (killed after `timeout_s`, or when this process is interrupted)."""
    started = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
        env=env,
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True),
        threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True),
    ]
    for r in readers:
        r.start()
    reaped: list[tuple[int, int, Any]] = []
    waiter = threading.Thread(target=lambda: reaped.append(os.wait4(proc.pid, 0)), daemon=True)
    waiter.start()
    timed_out = False
    try:
        waiter.join(timeout_s)
        if waiter.is_alive():
            timed_out = True
            _kill(proc.pid)
            waiter.join()
    except BaseException:  # Ctrl-C: the child goes with us
        _kill(proc.pid)
        waiter.join()
        raise
    _, status, usage = reaped[0]
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    proc.stdout.close()
    proc.stderr.close()
    stdout, stderr = "".join(out), "".join(err)
    return ChildResult(
        returncode=proc.returncode,
        record=last_json_line(stdout),
        stderr=stderr,
        wall_s=time.perf_counter() - t0,
        peak_rss_bytes=usage.ru_maxrss * 1024 if usage else 0,  # Linux: KiB
        started_at=started,
        timed_out=timed_out,
        command=tuple(cmd),
    )


def _kill(pid: int) -> None:
    """SIGKILL a child not yet reaped (not Popen.kill: its poll() would reap it first)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def require(result: ChildResult, what: str) -> dict[str, Any]:
    """The child's record, or ChildFailed naming `what` and why."""
    if not result.ok:
        raise ChildFailed(f"{what} failed: {result.error}")
    return result.record


def child_main(run: Callable[[list[str]], dict[str, Any]], argv: list[str] | None = None) -> int:
    """A child's main: `run(argv)` gives its record, printed as the last JSON line; a failure is
    printed the same way, in one line, with exit status 1."""
    try:
        record = run(sys.argv[1:] if argv is None else argv)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {first}"}), flush=True)
        return 1
    print(json.dumps({"ok": True, **record}), flush=True)
    return 0
