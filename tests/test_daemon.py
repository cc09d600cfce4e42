"""The daemon: destroys executed blocks' sessions off the inference agent's path, gives their
memory back and drops their file pages, except those later blocks still need."""

from __future__ import annotations

import os
import threading

import pytest

import hermes_ort
from hermes_ort.core.settings import STREAMING
from hermes_ort.streaming.daemon import Daemon, destroy, drop_own_files
from hermes_ort.streaming.integrity import Verifier
from hermes_ort.streaming.loader import load_block
from hermes_ort.streaming.readahead import is_cached


@pytest.fixture
def opened(toy_dir):
    os.sync()  # clean pages: the kernel drops only those
    verifier = Verifier(toy_dir, "size")
    specs = hermes_ort.load_manifest(toy_dir).blocks
    return toy_dir, [load_block(verifier, i, s, STREAMING, True) for i, s in enumerate(specs)]


def test_destroy_drops_the_pages_of_files_no_one_keeps(opened):
    model_dir, live = opened
    block = live[2]
    paths = [f.path for f in block.spec.files]
    keep = {paths[0]}  # say a later block reads the .onnx again
    destroy(block, model_dir, True, keep)
    assert block.session is None
    assert is_cached(str(model_dir / paths[0])) is True
    assert is_cached(str(model_dir / paths[1])) is False


def test_destroy_without_dropping_leaves_the_page_cache(opened):
    model_dir, live = opened
    destroy(live[1], model_dir, False, set())
    assert live[1].session is None
    assert all(is_cached(str(model_dir / f.path)) for f in live[1].spec.files)


def test_release_runs_in_the_background_and_calls_done_after_destroying(opened):
    model_dir, live = opened
    daemon = Daemon(model_dir)
    seen: list[tuple[str, object]] = []
    done = threading.Event()

    def finished():
        seen.append((threading.current_thread().name, live[3].session))
        done.set()

    try:
        daemon.release(live[3], False, set(), finished)
        assert done.wait(30)
        daemon.release_barrier()
    finally:
        daemon.shutdown()
    ((thread, session),) = seen
    assert thread.startswith("hermes-daemon") and session is None


def test_drop_own_files_leaves_shared_ones(opened):
    model_dir, live = opened
    spec = live[1].spec
    drop_own_files(spec, model_dir)
    own = [f for f in spec.files if spec.is_own(f)]
    assert own and not any(is_cached(str(model_dir / f.path)) for f in own)
