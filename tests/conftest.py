"""Shared fixtures: a toy block model (no torch needed) built once per session."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    return write_toy_model(tmp_path_factory.mktemp("toy") / "model")


@pytest.fixture
def toy_copy(toy_dir, tmp_path) -> Path:
    """A private copy for tests that damage the model directory."""
    return Path(shutil.copytree(toy_dir, tmp_path / "model"))


@pytest.fixture
def no_thread_leak():
    """Fails a test that leaves threads running after its models are closed."""
    before = {t.ident for t in threading.enumerate()}
    yield
    left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not left, f"threads left running: {left}"
