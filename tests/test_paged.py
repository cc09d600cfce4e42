"""Paged blocks (hermes_ort/streaming/paged.py, packed_copies.py, mapped_ranges.py): a session
opened from a block's saved packed copy gives the outputs of a normal prepacked session, before
and after its pages are dropped; dropping lowers the process's file-backed RSS and prefetching
brings the pages back; a damaged, foreign or half-written copy is refused with a PackedCopyError
naming it; the cache key follows the block's bytes, ORT's version and the CPU."""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from hermes_ort.core.choices import VerifyMode
from hermes_ort.core.errors import HermesError
from hermes_ort.core.manifest import load_manifest
from hermes_ort.core.settings import PREPACKED_STREAMING
from hermes_ort.streaming import packed_copies as pc
from hermes_ort.streaming import paged
from hermes_ort.streaming.mapped_ranges import (
    PAGE_BYTES,
    drop_ranges,
    mapped_ranges,
    page_counts,
    prefetch_ranges,
)
from hermes_ort.streaming.memory import rss_breakdown
from hermes_ort.streaming.packed_copies import PackedCopyError, cache_key, save_packed
from hermes_ort.streaming.paged import PagedSession
from hermes_ort.streaming.sessions import create_session
from hermes_ort.tensors.dataflow import Tensors
from hermes_ort.tensors.kv_cache import decoder_signature

try:
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx


# -- the mechanism on a plain private mapping (no model) -----------------------------------------
def test_drop_unmaps_clean_private_pages_and_keeps_written_ones(tmp_path):
    path = tmp_path / "weights.bin"
    data = np.arange(16 * PAGE_BYTES, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # MAP_PRIVATE, writable
    view = np.frombuffer(mm, dtype=np.uint8)
    try:
        assert int(view[:: PAGE_BYTES // 2].sum()) >= 0  # touch every page
        ranges = mapped_ranges(path)
        assert len(ranges) == 1 and ranges[0].private and ranges[0].bytes == 16 * PAGE_BYTES
        assert page_counts(ranges).file_bytes == 16 * PAGE_BYTES
        assert drop_ranges(ranges) == ()
        assert page_counts(ranges).resident_bytes == 0
        assert np.array_equal(view, data)  # faulted back in from the file
        prefetch_ranges(ranges)
        assert page_counts(ranges).file_bytes == 16 * PAGE_BYTES

        view[5] = 255  # a private copy now: dropping would bring back the file's byte
        assert page_counts(ranges).anon_bytes == PAGE_BYTES
        assert drop_ranges(ranges) == ranges
        assert view[5] == 255
    finally:
        del view
        mm.close()


# -- a tiny int4 decoder -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="exporting needs torch")
    out = tmp_path_factory.mktemp("paged") / "tiny-llama-int4"
    args = ["--preset", "tiny-llama", "--quantize", "int4", "--quant-method", "nbits"]
    assert fx.export_cli(out, *args, full_model=False) == 0
    return out


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "packed"


def _decode(manifest, run_block) -> list[dict[str, np.ndarray]]:
    """Every block's outputs over a 5-token prompt pass, then one decode step on its cache."""
    sig = decoder_signature(manifest)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (1, 5), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, 5), np.int64), **sig.empty_cache()}
    if sig.takes_position_ids:
        feeds["position_ids"] = np.arange(5, dtype=np.int64)[None]
    seen = []
    for _ in range(2):
        tensors = Tensors(manifest, feeds)
        for i, spec in enumerate(manifest.blocks):
            values = run_block(i, list(spec.outputs), tensors.inputs_of(i))
            seen.append(dict(zip(spec.outputs, values, strict=True)))
            tensors.put(i, values)
        out = tensors.outputs()
        token = np.array([[int(np.argmax(out["logits"][0, -1]))]], np.int64)
        past = feeds["attention_mask"].shape[1]
        feeds = {
            "input_ids": token,
            "attention_mask": np.ones((1, past + 1), np.int64),
            **{s.past: out[s.present] for s in sig.slots},
        }
        if sig.takes_position_ids:
            feeds["position_ids"] = np.array([[past]], np.int64)
    return seen


def _reference(model_dir: Path, manifest) -> list[dict[str, np.ndarray]]:
    sessions = [create_session(model_dir / b.path, PREPACKED_STREAMING) for b in manifest.blocks]
    return _decode(manifest, lambda i, names, feeds: sessions[i].run(names, feeds))


def _open_all(model_dir: Path, manifest, cache: Path) -> list[PagedSession]:
    return [paged.open_paged(model_dir / b.path, cache, threads=1) for b in manifest.blocks]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in x:
            np.testing.assert_allclose(x[name], y[name], rtol=0, atol=1e-6, err_msg=name)


def test_paged_outputs_equal_a_prepacked_session_before_and_after_drop(int4_dir, cache):
    manifest = load_manifest(int4_dir)
    reference = _reference(int4_dir, manifest)
    blocks = _open_all(int4_dir, manifest, cache)
    assert sum(len(b.copies) for b in blocks) > 0  # MatMulNBits copies were saved and adopted

    def run(i, names, feeds):
        return blocks[i].run(names, feeds)

    _same(_decode(manifest, run), reference)
    for b in blocks:
        assert b.drop(drop_cache=True) == ()
        assert b.resident_bytes() == 0
    _same(_decode(manifest, run), reference)  # faulted back in from the files

    def run_paged(i, names, feeds):  # as the engine would: prefetch, run, drop
        blocks[i].prefetch()
        out = blocks[i].run(names, feeds)
        blocks[i].drop()
        return out

    _same(_decode(manifest, run_paged), reference)


def test_drop_lowers_file_backed_rss_and_prefetch_restores_it(int4_dir, cache):
    manifest = load_manifest(int4_dir)
    blocks = _open_all(int4_dir, manifest, cache)
    for b in blocks:
        b.prefetch(whole=True)
        assert b.resident_bytes() == b.mapped_bytes > 0
    resident = sum(b.resident_bytes() for b in blocks)
    before = rss_breakdown()["file"]
    for b in blocks:
        assert b.drop(check=True) == ()  # ORT wrote to none of its mapped pages
    after = rss_breakdown()["file"]
    assert sum(b.resident_bytes() for b in blocks) == 0
    assert before - after >= resident // 2, (before, after, resident)
    # prefetch brings back the packed copies (what every run reads whole; the kernel's
    # fault-around may map a few pages beside them)
    dense = [b for b in blocks if b.copies]
    assert dense and all(0 < b.dense_bytes <= b.mapped_bytes for b in dense)
    for b in blocks:
        b.prefetch()
        assert b.dense_bytes <= b.resident_bytes() <= b.mapped_bytes
    for b in blocks:
        b.prefetch(whole=True)
    assert sum(b.resident_bytes() for b in blocks) == resident
    blocks[1].close()  # its addresses are no longer ORT's: nothing may be dropped there
    with pytest.raises(HermesError, match="closed"):
        blocks[1].drop()


def test_the_saved_copy_is_cached_and_keyed_by_the_blocks_bytes(int4_dir, tmp_path, cache):
    block = Path(shutil.copytree(int4_dir / "blocks", tmp_path / "blocks")) / "layer_01.onnx"
    key = cache_key(block)
    assert key == cache_key(block)
    saved = save_packed(block, cache, threads=1)
    assert saved.parent.name == f"layer_01-{key}"
    mtime = saved.stat().st_mtime_ns
    assert save_packed(block, cache, threads=1) == saved and saved.stat().st_mtime_ns == mtime
    assert not list(cache.glob(".*.tmp"))  # no temporary directory left

    data = block.with_suffix(".data")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    assert cache_key(block) != key  # the weights' bytes are in the key, not only the graph's
    assert save_packed(block, cache, threads=1) != saved
    assert cache_key(block, PREPACKED_STREAMING, {"layer_01.onnx": "0" * 64}) != cache_key(block)


def test_the_key_follows_the_cpu_and_the_ort_version(int4_dir, monkeypatch):
    block = int4_dir / "blocks" / "layer_00.onnx"
    a = pc.cpu_fingerprint("processor: 0\nflags: fpu sse avx2\n")
    assert a == pc.cpu_fingerprint("processor: 0\nflags: avx2 sse fpu\n")
    assert a != pc.cpu_fingerprint("processor: 0\nflags: fpu sse avx2 avx512f\n")
    key = cache_key(block)
    monkeypatch.setattr(pc.ort, "__version__", "0.0.1")
    assert cache_key(block) != key


def test_a_crashed_save_leaves_no_copy_under_its_key(int4_dir, cache, monkeypatch):
    block = int4_dir / "blocks" / "layer_00.onnx"

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(pc.os, "rename", crash)
    with pytest.raises(PackedCopyError, match="disk full"):
        save_packed(block, cache, threads=1)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    stale = cache / ".layer_00-x.y.tmp"
    stale.mkdir()
    os.utime(stale, (0, 0))
    save_packed(block, cache, threads=1)
    assert not stale.exists()


def _saved(int4_dir: Path, cache: Path, name: str = "layer_00") -> Path:
    return save_packed(int4_dir / "blocks" / f"{name}.onnx", cache, threads=1)


def test_a_damaged_packed_copy_is_refused(int4_dir, cache):
    saved = _saved(int4_dir, cache)
    first = pc.packed_copies(saved)[0]
    data = saved.with_suffix(".data")
    raw = bytearray(data.read_bytes())
    raw[first.offset : first.offset + 64] = bytes(64 * [0xAB])
    data.write_bytes(bytes(raw))
    with pytest.raises(PackedCopyError, match="damaged.*sha256"):
        PagedSession(saved, threads=1)
    # sizes only: ORT compares the copy with what its kernel packs, and refuses it
    with pytest.raises(PackedCopyError, match="do not match"):
        PagedSession(saved, threads=1, verify=VerifyMode.SIZE)


def test_a_copy_made_for_another_kernel_layout_is_refused(int4_dir, cache):
    """A copy whose keys no kernel of this machine makes: ORT would pack its own and leave the
    saved one unused (the weights anonymous, unseen): refused instead."""
    saved = _saved(int4_dir, cache)
    text = saved.read_bytes()
    forged = re.sub(  # the first digit of every MatMulNBits copy's key, changed
        rb"MatMulNBits\+(\d)", lambda m: b"MatMulNBits+%d" % ((int(m[1]) + 1) % 10), text
    )
    assert forged != text and len(forged) == len(text)
    saved.write_bytes(forged)
    with pytest.raises(PackedCopyError, match="did not use .* packed copies"):
        PagedSession(saved, threads=1, verify=VerifyMode.SIZE)


def test_a_truncated_or_unfinished_or_foreign_copy_is_refused(int4_dir, cache):
    saved = _saved(int4_dir, cache)
    data = saved.with_suffix(".data")
    size = data.stat().st_size
    os.truncate(data, size - 100)
    with pytest.raises(PackedCopyError, match="bytes"):
        PagedSession(saved, threads=1, verify=VerifyMode.SIZE)

    meta_path = saved.parent / pc.META_NAME
    meta = json.loads(meta_path.read_text())
    meta["onnxruntime"] = "0.0.1"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PackedCopyError, match="onnxruntime 0.0.1"):
        PagedSession(saved, threads=1)

    meta_path.unlink()
    with pytest.raises(PackedCopyError, match="not a finished save"):
        PagedSession(saved, threads=1)
