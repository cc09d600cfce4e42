"""The servers the serving benchmark runs, each a child process under the same emulated board:
a memory cgroup with the cap (memory.limit_in_bytes) and the same cores (bench/device.py's
Launch), its model files evicted from the page cache first (a cap only binds pages the group
faults itself: docs/design.md §3).

    hermes            `python -m hermes_ort serve DIR --budget B --max-batch N --ctx C`
    llama-server      llama.cpp's C++ server: --parallel N slots, continuous batching
                      (bench/serving/build_llama_server.sh builds it)
    llama-cpp-python  `python -m llama_cpp.server`: one request at a time behind a lock (app.py's
                      get_llama_proxy); a streamed request is cut short when another arrives
                      unless --interrupt_requests False, which is passed

Memory is measured three ways: the process's RSS sampled from outside (VmHWM and VmRSS every
SAMPLE_S: hermes-ort resets its own VmHWM per pass, so its final VmHWM alone undercounts), its
VmHWM read just before SIGTERM, and the cgroup's memory.max_usage_in_bytes (page cache included)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import REPO, child_env
from hermes_ort.core.choices import Choice

CACHE = Path.home() / ".cache" / "hermes-ort"
LLAMA_SERVER_BIN = Path(
    os.environ.get("HERMES_LLAMA_SERVER", CACHE / "llama-server" / "bin" / "llama-server")
)
# llama_cpp.server's extra dependencies, kept apart from .venv (build_llama_server.sh puts them)
LLAMA_CPP_SERVER_DEPS = Path(
    os.environ.get("LLAMA_CPP_SERVER_DEPS", CACHE / "llama-cpp-server-deps")
)
BUILD_SCRIPT = "bench/serving/build_llama_server.sh"
SAMPLE_S = 0.02  # RSS sampling period
STOP_TIMEOUT_S = 45.0  # SIGTERM to exit, else SIGKILL (hermes-ort lets requests run 30 s)
LOG_TAIL_LINES = 15


class ServerKind(Choice):
    HERMES = "hermes"
    LLAMA_SERVER = "llama-server"
    LLAMA_CPP_PYTHON = "llama-cpp-python"


@dataclass(frozen=True)
class ServerSpec:
    kind: ServerKind
    weights: Path  # hermes: the exported model directory; the others: the GGUF file
    port: int
    max_batch: int = 1  # hermes --max-batch, llama-server --parallel (llama_cpp.server: 1)
    ctx: int = 256  # positions per sequence (llama-server's -c is ctx x max_batch, over its slots)
    threads: int = 2
    budget_bytes: int | None = None  # hermes only
    host: str = "127.0.0.1"
    api_key: str | None = None
    no_repack: bool = False  # llama-server: weights kept mmapped as the file has them

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def server_command(spec: ServerSpec, python: str = sys.executable) -> list[str]:
    """The command line that starts `spec`'s server."""
    common_key = ["--api-key", spec.api_key] if spec.api_key else []
    if spec.kind == ServerKind.HERMES:
        cmd = [python, "-m", "hermes_ort", "serve", str(spec.weights), "--host", spec.host]
        cmd += ["--port", str(spec.port), "--max-batch", str(spec.max_batch)]
        cmd += ["--ctx", str(spec.ctx)]
        if spec.budget_bytes is not None:
            cmd += ["--budget", str(spec.budget_bytes)]
        return cmd + common_key
    if spec.kind == ServerKind.LLAMA_SERVER:
        cmd = [str(LLAMA_SERVER_BIN), "-m", str(spec.weights), "--host", spec.host]
        cmd += ["--port", str(spec.port), "--parallel", str(spec.max_batch), "--cont-batching"]
        cmd += ["-c", str(spec.ctx * spec.max_batch), "-t", str(spec.threads)]
        cmd += ["-tb", str(spec.threads), "--no-webui"]
        # every prompt computed in full (no reuse of a slot's cached prompt, no host-RAM cache of
        # slots); no fitting of unset options to the free memory (the options here are all set)
        cmd += ["--no-cache-prompt", "--cache-ram", "0", "--fit", "off"]
        # its default repacks q4_0 into anonymous memory (the whole model, more than a cap of
        # half of it): --no-repack keeps the file's layout, mmapped, so the cap can page it
        cmd += ["--no-repack"] if spec.no_repack else []
        return cmd + common_key
    cmd = [python, "-m", "llama_cpp.server", "--model", str(spec.weights), "--host", spec.host]
    cmd += ["--port", str(spec.port), "--n_ctx", str(spec.ctx)]
    cmd += ["--n_threads", str(spec.threads), "--n_threads_batch", str(spec.threads)]
    # logits_all (on by default) keeps an (n_ctx, vocabulary) float array that only logprobs
    # need: off, so it costs nothing under the cap
    cmd += ["--interrupt_requests", "False", "--logits_all", "False"]
    return cmd + (["--api_key", spec.api_key] if spec.api_key else [])


def ready_path(kind: ServerKind) -> str:
    """What answers 200 once the model is loaded (llama_cpp.server loads before it listens)."""
    return "/v1/models" if kind == ServerKind.LLAMA_CPP_PYTHON else "/health"


def server_env(kind: ServerKind) -> dict[str, str]:
    env = child_env()
    if kind == ServerKind.LLAMA_CPP_PYTHON:
        env["PYTHONPATH"] += os.pathsep + str(LLAMA_CPP_SERVER_DEPS)
    return env


def missing(kind: ServerKind, python: str = sys.executable) -> str | None:
    """None when `kind` can run here, else why not and how to get it."""
    import subprocess

    if kind == ServerKind.LLAMA_SERVER:
        if not os.access(LLAMA_SERVER_BIN, os.X_OK):
            return f"no llama-server at {LLAMA_SERVER_BIN}: run {BUILD_SCRIPT}"
        return None
    if kind == ServerKind.LLAMA_CPP_PYTHON:
        code = "import llama_cpp.server.app"
    else:  # the serve command: present once `hermes-ort serve --help` answers
        code = "from hermes_ort.cli.main import main; main(['serve', '--help'])"
    done = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, env=server_env(kind), timeout=120
    )
    if done.returncode == 0:
        return None
    tail = (done.stderr.strip().splitlines() or ["?"])[-1]
    if kind == ServerKind.LLAMA_CPP_PYTHON:
        return f"llama_cpp.server does not import ({tail}): run {BUILD_SCRIPT}"
    return f"`hermes-ort serve` is not available in this tree ({tail})"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def model_files(weights: Path) -> list[Path]:
    if weights.is_file():
        return [weights]
    return sorted(p for p in weights.rglob("*") if p.is_file())


def evict(weights: Path) -> None:
    """Drop the model's pages from the page cache: the capped group faults (and is charged for)
    every page it reads."""
    from hermes_ort.streaming.memory import drop_file_cache

    for path in model_files(weights):
        drop_file_cache(str(path))


def status_bytes(pid: int, field_name: str) -> int | None:
    """A `kB` field of /proc/PID/status (VmHWM, VmRSS) in bytes; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return None


class RssSampler(threading.Thread):
    """Max of VmHWM and VmRSS of one pid, read every SAMPLE_S until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True, name=f"rss-{pid}")
        self.pid = pid
        self.peak_bytes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(SAMPLE_S)

    def sample(self) -> None:
        for name in ("VmHWM", "VmRSS"):
            value = status_bytes(self.pid, name)
            if value is not None:
                self.peak_bytes = max(self.peak_bytes, value)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def http_get(url: str, api_key: str | None = None, timeout_s: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answered."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout_s
        ) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, ValueError):
        return 0, ""


def is_ready(kind: ServerKind, status: int, body: str) -> bool:
    if status != 200:
        return False
    if kind == ServerKind.LLAMA_CPP_PYTHON:
        return True
    try:
        return json.loads(body).get("status") == "ok"
    except (ValueError, AttributeError):
        return False


@dataclass
class ServerRecord:
    """One server's life under the cap, as measured from outside."""

    kind: str
    command: list[str]
    cap_bytes: int | None
    cap_enforced: bool
    budget_bytes: int | None
    max_batch: int
    ctx: int
    cpus: list[int]
    ready: bool = False
    startup_s: float | None = None  # spawn to the first ready answer
    error: str | None = None
    killed_for_memory: bool = False
    peak_rss_bytes: int | None = None  # sampled max of VmHWM/VmRSS over its life
    vmhwm_at_stop_bytes: int | None = None  # VmHWM just before SIGTERM
    rusage_maxrss_bytes: int | None = None  # wait4's ru_maxrss
    cgroup_peak_bytes: int | None = None  # memory.max_usage_in_bytes: RSS + page cache charged
    cgroup_failcnt: int | None = None
    oom_kills: int | None = None
    exit_code: int | None = None  # negative: killed by that signal
    stopped_by: str | None = None  # "SIGTERM" | "SIGKILL" | "exited" (on its own, early)
    log_path: str | None = None
    log_tail: list[str] = field(default_factory=list)

    @property
    def stopped_cleanly(self) -> bool:
        """Exited within STOP_TIMEOUT_S of SIGTERM, with 0 or by SIGTERM itself (uvicorn re-raises
        the signal after its graceful shutdown)."""
        return self.stopped_by == "SIGTERM" and self.exit_code in (0, -signal.SIGTERM)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "stopped_cleanly": self.stopped_cleanly}


class Server:
    """`with Server(spec, emulation, cap_bytes, log_path) as s:` starts the server in its groups
    and waits until it is ready (`s.record.ready`; if not, `s.record.error` says why); leaving
    the block stops it with SIGTERM and fills `s.record` (memory, exit). The groups are always
    removed."""

    def __init__(
        self,
        spec: ServerSpec,
        emulation,
        cap_bytes: int | None,
        log_path: Path,
        ready_timeout_s: float = 600,
        python: str = sys.executable,
    ):
        from bench.device import Launch

        self.spec = spec
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.command = server_command(spec, python)
        self.launch = Launch(emulation, cores=spec.threads, cap_bytes=cap_bytes, tag="serve")
        self.record = ServerRecord(
            kind=str(spec.kind),
            command=self.command,
            cap_bytes=cap_bytes,
            cap_enforced=self.launch.cap_enforced,
            budget_bytes=spec.budget_bytes,
            max_batch=spec.max_batch,
            ctx=spec.ctx,
            cpus=list(self.launch.cpus),
            log_path=str(log_path),
        )
        self.pid: int | None = None
        self._sampler: RssSampler | None = None
        self._rusage = None

    @property
    def base_url(self) -> str:
        return self.spec.base_url

    def __enter__(self) -> Server:
        import subprocess

        evict(self.spec.weights)
        self.launch.__enter__()
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "wb") as log:
                t0 = time.perf_counter()
                proc = subprocess.Popen(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=self.launch.preexec,
                    env=server_env(self.spec.kind),
                    cwd=REPO,
                    start_new_session=True,  # a Ctrl-C reaches the bench, which stops it
                )
            self.pid = proc.pid
            self._sampler = RssSampler(proc.pid)
            self._sampler.start()
            self._wait_ready(t0)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self, t0: float) -> None:
        url = self.spec.base_url + ready_path(self.spec.kind)
        while time.perf_counter() - t0 < self.ready_timeout_s:
            if self._reap(block=False):
                self.record.error = f"exited before it was ready (status {self.record.exit_code})"
                return
            status, body = http_get(url, self.spec.api_key)
            if is_ready(self.spec.kind, status, body):
                self.record.ready = True
                self.record.startup_s = time.perf_counter() - t0
                return
            time.sleep(0.2)
        self.record.error = f"not ready after {self.ready_timeout_s:.0f} s"

    def _reap(self, block: bool) -> bool:
        """Whether the server has exited (reaped with its rusage)."""
        if self.pid is None:
            return True
        if self.record.exit_code is not None:
            return True
        try:
            pid, status, rusage = os.wait4(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False
        self.record.exit_code = os.waitstatus_to_exitcode(status)
        self._rusage = rusage
        return True

    def _stop(self) -> None:
        if self.pid is None:
            return
        if self._reap(block=False):
            self.record.stopped_by = self.record.stopped_by or "exited"
            return
        self.record.vmhwm_at_stop_bytes = status_bytes(self.pid, "VmHWM")
        os.kill(self.pid, signal.SIGTERM)
        self.record.stopped_by = "SIGTERM"
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while not self._reap(block=False):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.record.stopped_by = "SIGKILL"
                self._reap(block=True)
                break
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        try:
            if self._sampler is not None:
                self._sampler.sample()
            self._stop()
        finally:
            if self._sampler is not None:
                self._sampler.stop()
                self.record.peak_rss_bytes = self._sampler.peak_bytes or None
            self.launch.__exit__(None, None, None)  # memory stats, then the groups removed
        self._fill_record()

    def _fill_record(self) -> None:
        r = self.record
        if self._rusage is not None:
            r.rusage_maxrss_bytes = self._rusage.ru_maxrss * 1024
        mem = self.launch.memory
        if mem is not None:
            r.cgroup_peak_bytes, r.cgroup_failcnt, r.oom_kills = (
                mem.peak_bytes,
                mem.failcnt,
                mem.oom_kills,
            )
        r.killed_for_memory = bool(mem and mem.oom_kills) or (
            r.cap_enforced and r.exit_code == -signal.SIGKILL and r.stopped_by != "SIGKILL"
        )
        if r.killed_for_memory and (r.error is None or r.error.startswith("exited")):
            r.error = "killed for memory"
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        r.log_tail = lines[-LOG_TAIL_LINES:]
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        if r.error and r.error.startswith("exited") and last:
            r.error += f": {last[:200]}"  # e.g. hermes-ort's refusal of the budget
