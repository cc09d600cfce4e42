"""Faults during a run surface promptly as clear errors, leave nothing behind, and the model
works again once the cause is gone."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import hermes_ort
from hermes_ort import loader as loader_module


@pytest.mark.parametrize("strategy", ["pipeload", "ondemand", "pipeswitch"])
def test_block_file_removed_mid_run(toy_copy, strategy, no_thread_leak):
    victim = toy_copy / "blocks" / "layer_02.data"
    hidden = victim.with_suffix(".moved")
    with hermes_ort.load(
        toy_copy, strategy=strategy, window=2 if strategy == "pipeload" else None
    ) as model:
        feeds = model.sample_inputs()
        expected = model.run(feeds)["logits"]
        if strategy == "pipeswitch":  # everything resident: a second run reads no file
            return
        os.rename(victim, hidden)
        with pytest.raises(hermes_ort.IntegrityError, match="layer_02.data"):
            model.run(feeds)
        os.rename(hidden, victim)
        np.testing.assert_array_equal(model.run(feeds)["logits"], expected)


def test_loader_failure_is_raised_before_its_block_is_reached(toy_dir, monkeypatch, no_thread_leak):
    real = loader_module.load_block
    reached = []

    def slow_or_failing(model_dir, index, spec, settings, readahead):
        if index == 4:
            raise hermes_ort.LoadError(f"block '{spec.name}': injected failure")
        if index == 2:
            time.sleep(0.3)  # the failure of block 4 is known long before block 2 is done
        reached.append(index)
        return real(model_dir, index, spec, settings, readahead)

    monkeypatch.setattr(loader_module, "load_block", slow_or_failing)
    with hermes_ort.load(toy_dir, loaders=3, window=4) as model:
        t0 = time.perf_counter()
        with pytest.raises(hermes_ort.LoadError, match="layer_03.*injected"):
            model.run(model.sample_inputs())
        assert time.perf_counter() - t0 < 2.0
        monkeypatch.setattr(loader_module, "load_block", real)
        assert model.run(model.sample_inputs())["logits"].shape[-1] == 50


def test_damaged_block_is_named(toy_copy):
    path = toy_copy / "blocks" / "layer_01.onnx"
    data = bytearray(path.read_bytes())
    data[10:60] = b"\xff" * 50  # same size, garbage inside: only ORT can tell
    path.write_bytes(bytes(data))
    with (
        hermes_ort.load(toy_copy, window=2) as model,
        pytest.raises(hermes_ort.LoadError, match="layer_01.onnx"),
    ):
        model.run(model.sample_inputs())


def test_truncated_block_is_named(toy_copy):
    path = toy_copy / "blocks" / "epilogue.data"
    path.write_bytes(path.read_bytes()[:-100])
    with (
        hermes_ort.load(toy_copy) as model,
        pytest.raises(hermes_ort.IntegrityError, match="epilogue.data.*bytes"),
    ):
        model.run(model.sample_inputs())


def test_concurrent_runs_are_serialised(toy_dir):
    with hermes_ort.load(toy_dir, window=2) as model:
        feeds = model.sample_inputs()
        expected = model.run(feeds)["logits"]
        results, errors = [], []

        def worker():
            try:
                for _ in range(5):
                    results.append(model.run(feeds)["logits"])
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors and len(results) == 20
        assert all(np.array_equal(r, expected) for r in results)
