"""Helpers for the server tests (tests/test_serve_api.py): a real `hermes-ort serve` process on a
free port of 127.0.0.1, ready once GET /health answers, stopped by SIGTERM (then killed); raw HTTP
through http.client for what the official client will not send (broken bodies, a closed socket);
/metrics read as numbers; the process's resident set sampled from outside.

    server = ServerProcess(model_dir, "--name", "tiny", log=tmp / "server.log").start()
    reply = server.request("POST", "/v1/completions", {"model": "tiny", "prompt": "Hi"})
    server.stop()
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:  # the tiny decoder's tokenizer and chat template (re-exported)
    from test_chat import write_tokenizer  # noqa: F401
except ImportError:  # pragma: no cover  (tests/ as a package)
    from tests.test_chat import write_tokenizer  # noqa: F401

HOST = "127.0.0.1"
READY_S = 180.0  # a server opens its model (and may measure a profile) before /health answers
STOP_S = 20.0  # SIGTERM to exit, before it is killed
SAMPLE_S = 0.02  # resident set sampling period


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


class ServerProcess:
    """`python -m hermes_ort serve MODEL_DIR --port P ARGS...`, its stderr kept in `log`."""

    def __init__(self, model_dir: Path, *args: str, log: Path) -> None:
        self.port = free_port()
        self.args = [str(model_dir), "--port", str(self.port), *args]
        self.log = log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def launch(self) -> ServerProcess:
        with open(self.log, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "hermes_ort", "serve", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        return self

    def start(self, ready_s: float = READY_S) -> ServerProcess:
        """Launch and wait until GET /health answers 200; the test fails with the server's
        stderr if it exits or does not answer in time."""
        self.launch()
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited ({self.process.returncode}):\n{self.stderr()}")
            try:
                if self.request("GET", "/health", timeout_s=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"the server did not answer /health within {ready_s:.0f} s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout_s: float = STOP_S) -> int | None:
        """SIGTERM, then kill if it has not exited in `timeout_s`; its exit status."""
        p = self.process
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 120,
    ) -> Reply:
        """One request on a new connection (see `request`)."""
        return request(self.port, method, path, body, headers, timeout_s)

    def metrics(self) -> dict[str, float]:
        """/metrics' unlabelled samples, by name."""
        text = self.request("GET", "/metrics", timeout_s=10).text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(hermes_\w+) (\S+)$", text, re.M)}


class Servers:
    """Servers started for a test or a module, each on its own copy of its model directory (a
    server writes beside the manifest), with `args` first; all stopped by `stop_all`."""

    def __init__(self, new_dir: Callable[[], Path], args: tuple[str, ...] = ()) -> None:
        self.new_dir, self.args = new_dir, args
        self.started: list[ServerProcess] = []

    def make(self, model_dir: Path, *args: str) -> ServerProcess:
        """A server not launched yet (`.start()` it)."""
        where = self.new_dir()
        copy = Path(shutil.copytree(model_dir, where / model_dir.name))
        server = ServerProcess(copy, *self.args, *args, log=where / "server.log")
        self.started.append(server)
        return server

    def start(self, model_dir: Path, *args: str) -> ServerProcess:
        return self.make(model_dir, *args).start()

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 120,
) -> Reply:
    """One request on a new connection, its whole answer read. `body`: bytes sent as they are,
    a list of bytes sent in chunks (Transfer-Encoding: chunked, no Content-Length), else JSON."""
    conn = _send(port, method, path, body, headers, timeout_s)
    try:
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def post(port: int, path: str, body: dict, timeout_s: float = 60) -> http.client.HTTPConnection:
    """A POST sent, its answer not read yet: `.getresponse()` (then `.readline()` for a stream)
    when the test wants it, `.close()` to leave as a client that goes away."""
    return _send(port, "POST", path, body, None, timeout_s)


def _send(port, method, path, body, headers, timeout_s) -> http.client.HTTPConnection:
    as_sent = body is None or isinstance(body, (bytes, list))
    data = body if as_sent else json.dumps(body).encode()
    sent = {"Content-Type": "application/json"} if data is not None else {}
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    conn.request(method, path, data, {**sent, **(headers or {})})
    return conn


def sse_events(response) -> list[Any]:
    """The `data:` payloads of a server-sent event stream read to its end (JSON, or the string
    "[DONE]"); a stream cut short ends the list where it was cut."""
    events = []
    try:
        for line in iter(response.readline, b""):
            if line.startswith(b"data: "):
                data = line[6:].strip().decode()
                events.append(data if data == "[DONE]" else json.loads(data))
    except (http.client.IncompleteRead, ConnectionError):
        pass
    return events


def status_bytes(pid: int, field: str) -> int | None:
    """A kB field of /proc/PID/status (VmHWM, VmRSS) in bytes; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(found[1]) * 1024 if found else None


class RssSampler(threading.Thread):
    """The max of VmHWM and VmRSS of `pid`, read every SAMPLE_S until `stop()`. Sampled: the
    server resets its own VmHWM (the engine does, per pass), so a VmHWM read at the end alone
    undercounts."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name=f"rss-{pid}")
        self.pid, self.peak_bytes = pid, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            for field in ("VmHWM", "VmRSS"):
                self.peak_bytes = max(self.peak_bytes, status_bytes(self.pid, field) or 0)
            self._done.wait(SAMPLE_S)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak_bytes


def wait_for(predicate, timeout_s: float, every_s: float = 0.05) -> bool:
    """True as soon as `predicate()` is, False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return bool(predicate())
