"""Shared fixtures: the toy block model (no torch needed), written once per session and copied
for every test that opens it, so no test sees another's files (verified.json, profile.json, damage)
and results do not depend on the order tests run in."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest
from toy_model import write_toy_model

# Started in the background of a non-interactive shell (`cmd &`, some CI runners), pytest inherits
# SIGINT ignored, and so would every command a test interrupts: give them a terminal's Ctrl-C.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(path.relative_to(root).as_posix().encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session", autouse=True)
def packed_cache(tmp_path_factory) -> Path:
    """Paged blocks' saved packed copies (streaming/packed_copies.py) go to a directory of this
    session, never the user's cache; child processes inherit it."""
    path = tmp_path_factory.mktemp("packed")
    previous = os.environ.get("HERMES_ORT_PACKED_CACHE")
    os.environ["HERMES_ORT_PACKED_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("HERMES_ORT_PACKED_CACHE", None)
    else:
        os.environ["HERMES_ORT_PACKED_CACHE"] = previous


@pytest.fixture(scope="session")
def toy_source(tmp_path_factory) -> Path:
    """The toy model as written; tests get copies (`toy_dir`) and must never open this one: the
    session fails at its end if anything here changed."""
    source = write_toy_model(tmp_path_factory.mktemp("toy") / "model")
    before = _tree_digest(source)
    yield source
    assert _tree_digest(source) == before, "a test wrote into the shared toy model"


@pytest.fixture
def toy_dir(toy_source, tmp_path) -> Path:
    """A private copy of the toy model for this test (a few hundred KB)."""
    return Path(shutil.copytree(toy_source, tmp_path / "model"))


@pytest.fixture
def no_thread_leak():
    """Fails a test that leaves threads running after its models are closed."""
    before = {t.ident for t in threading.enumerate()}
    yield
    left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not left, f"threads left running: {left}"


@pytest.fixture
def private(tmp_path):
    """`private(model_dir)`: a copy of a (module-scoped, shared) model directory for this test
    alone, so what a load writes beside the manifest stays with this test."""
    count = iter(range(1_000_000))

    def copy(source: Path) -> Path:
        return Path(shutil.copytree(source, tmp_path / f"private-{next(count)}-{source.name}"))

    return copy
