"""Loading agents: a block is checked, read ahead when its plan says so, and opened; k agents
load k blocks at once; failures name the block."""

from __future__ import annotations

import os
import threading

import pytest

import hermes_ort
from hermes_ort.core.settings import STREAMING
from hermes_ort.streaming import loader
from hermes_ort.streaming.integrity import Verifier
from hermes_ort.streaming.memory import drop_file_cache
from hermes_ort.streaming.readahead import is_cached


@pytest.fixture
def blocks(toy_dir):
    os.sync()  # the copy's pages are dirty: the kernel drops only clean ones
    manifest = hermes_ort.load_manifest(toy_dir)
    return Verifier(toy_dir, "size"), manifest.blocks


def _own_data(verifier, spec):
    return [verifier.model_dir / f.path for f in spec.files if f.path.endswith(".data")]


@pytest.mark.parametrize("readahead", [True, False])
def test_a_block_is_read_ahead_only_when_asked(blocks, readahead):
    verifier, specs = blocks
    spec = specs[2]
    data = _own_data(verifier, spec)
    for path in data:
        drop_file_cache(str(path))
    if any(is_cached(str(p)) for p in data):
        pytest.skip("this file system keeps the pages")
    live = loader.load_block(verifier, 2, spec, STREAMING, readahead)
    try:
        assert live.session is not None and live.index == 2 and live.create_s > 0
        assert all(is_cached(str(p)) for p in data) == readahead
        assert (live.bytes_read_ahead > 0) == readahead
    finally:
        live.session = None


def test_a_session_taking_inputs_its_manifest_does_not_list_is_refused(blocks):
    from dataclasses import replace

    verifier, specs = blocks
    spec = replace(specs[2], inputs=("h_1",))  # the layer also reads 'mask'
    with pytest.raises(hermes_ort.LoadError, match=r"layer_01.*takes inputs \['mask'\]"):
        loader.load_block(verifier, 2, spec, STREAMING, False)


def test_k_agents_load_k_blocks_at_once(blocks, monkeypatch):
    """Two agents: two loads are in progress together (each waits for the other at a barrier,
    which one agent alone could never pass)."""
    verifier, specs = blocks
    barrier = threading.Barrier(2, timeout=30)
    real = loader.load_block

    def meeting(verifier, index, spec, settings, readahead):
        barrier.wait()
        return real(verifier, index, spec, settings, readahead)

    monkeypatch.setattr(loader, "load_block", meeting)
    agents = loader.LoadingAgents(verifier, 2)
    try:
        futures = [agents.submit(i, specs[i], STREAMING, True) for i in (1, 2)]
        live = [f.result(timeout=60) for f in futures]
        assert [b.index for b in live] == [1, 2]
    finally:
        agents.shutdown()


def test_an_unexpected_failure_still_names_the_block(blocks, monkeypatch):
    verifier, specs = blocks

    def broken(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(loader, "load_block", broken)
    agents = loader.LoadingAgents(verifier, 1)
    try:
        future = agents.submit(3, specs[3], STREAMING, True)
        with pytest.raises(hermes_ort.LoadError, match="block 'layer_02': RuntimeError: disk"):
            future.result(timeout=30)
    finally:
        agents.shutdown()
