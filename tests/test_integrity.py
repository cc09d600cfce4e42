"""Damaged and hostile model directories. Hashes: every file checked once before its first use,
cached by stat (per process and in verified.json), checked again once it changes. External data:
an .onnx may only name files the manifest lists for it, inside the model directory."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import hermes_ort
from hermes_ort.core.settings import STREAMING
from hermes_ort.streaming import integrity
from hermes_ort.streaming.external_data import (
    _SCHEMA,
    WireError,
    external_locations,
    locations_in_bytes,
)
from hermes_ort.streaming.sessions import create_session

ROOT = Path(__file__).resolve().parents[1]


def _flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def _reseal(model_dir: Path, rel: str) -> None:
    """Make the manifest agree with a file's bytes, as the author of a hostile directory would."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    body = (model_dir / rel).read_bytes()
    entries = [f for b in manifest["blocks"] for f in b["files"]] + manifest["full_model"]["files"]
    for entry in entries:
        if entry["path"] == rel:
            entry.update(bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    (model_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def hashed(monkeypatch):
    """Names of the files hashed from now on (by any model's verifier)."""
    calls: list[str] = []
    real = integrity.sha256_file

    def spy(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(integrity, "sha256_file", spy)
    return calls


@pytest.fixture
def settled(monkeypatch):
    """Files count as settled at once (no racy window), as a model exported a while ago is."""
    monkeypatch.setattr(integrity, "RACY_NS", 0)


# -- bytes changed, files swapped ----------------------------------------------------------------
@pytest.mark.parametrize(
    "rel", ["blocks/layer_01.onnx", "blocks/layer_02.data", "blocks/prologue.data"]
)
def test_changed_bytes_are_named_before_anything_runs(toy_dir, rel):
    _flip_byte(toy_dir / rel)
    with pytest.raises(hermes_ort.IntegrityError, match=f"'{rel}' does not match its sha256"):
        hermes_ort.load(toy_dir)


def test_swapped_data_file_is_named_and_size_mode_would_miss_it(toy_dir):
    blocks = toy_dir / "blocks"
    with hermes_ort.load(toy_dir, window=2) as model:
        feeds = model.sample_inputs()
        expected = model.run(feeds)["logits"]
    shutil.copyfile(blocks / "layer_02.data", blocks / "layer_01.data")  # same size, other weights
    with pytest.raises(hermes_ort.IntegrityError, match="'blocks/layer_01.data' does not match"):
        hermes_ort.load(toy_dir)
    with hermes_ort.load(toy_dir, window=2, verify="size") as model:  # why "once" is the default
        assert not np.allclose(model.run(feeds)["logits"], expected)


def test_whole_model_file_is_verified_for_full(toy_dir):
    _flip_byte(toy_dir / "full" / "model.data")
    hermes_ort.load(toy_dir).close()  # the blocks are intact: pipeload does not open it
    with pytest.raises(hermes_ort.IntegrityError, match="'full/model.data' does not match"):
        hermes_ort.load(toy_dir, strategy="full")


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["write", "write-then-touch-r"])
def test_file_changed_after_verification_is_hashed_again(toy_dir, settled, restore_mtime):
    victim = toy_dir / "blocks" / "layer_03.data"
    original = victim.read_bytes()
    with hermes_ort.load(toy_dir, window=2) as model:
        feeds = model.sample_inputs()
        expected = model.run(feeds)["logits"]
        before = os.stat(victim)
        _flip_byte(victim)  # in place: same size, same inode
        if restore_mtime:  # the times say nothing changed; the ctime still does
            os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
        with pytest.raises(
            hermes_ort.IntegrityError, match="'blocks/layer_03.data' does not match"
        ):
            model.run(feeds)
        victim.write_bytes(original)
        np.testing.assert_array_equal(model.run(feeds)["logits"], expected)


def test_hashes_are_cached_by_the_model_and_on_disk(toy_dir, hashed, settled):
    assert not (toy_dir / "verified.json").exists()  # a private copy: nothing cached yet
    files = len(hermes_ort.load_manifest(toy_dir).block_files())
    with hermes_ort.load(toy_dir, window=2) as model:
        assert len(hashed) == files and len(model.verifier.hashed) == files
        for _ in range(2):  # every block opened twice: their stat is checked, nothing hashed
            model.run(model.sample_inputs())
        assert len(hashed) == files
    cache = json.loads((toy_dir / "verified.json").read_text())
    assert len(cache["files"]) == files and cache["kind"] == "hermes-ort-verified"

    hermes_ort.load(toy_dir).close()  # another load (or process): verified.json
    assert len(hashed) == files

    (toy_dir / "verified.json").write_bytes(b"\x80\x04garbage")  # unreadable: hash again
    hermes_ort.load(toy_dir).close()
    assert len(hashed) == 2 * files

    data = toy_dir / "blocks" / "layer_00.data"  # replaced by an identical copy: new inode
    shutil.copyfile(data, data.with_suffix(".tmp"))
    os.replace(data.with_suffix(".tmp"), data)
    hermes_ort.load(toy_dir).close()
    assert hashed[2 * files :] == ["layer_00.data"]

    hermes_ort.load(toy_dir, verify="size").close()
    with pytest.raises(
        hermes_ort.OptionError, match="unknown verify 'never' \\(choose from once, size\\)"
    ):
        hermes_ort.load(toy_dir, verify="never")
    assert len(hashed) == 2 * files + 1


def test_freshly_written_files_are_not_trusted_from_the_cache(toy_dir, hashed):
    """Within RACY_NS of a write, a second write in the same clock tick could leave the file's
    times unchanged: such files are hashed at every load until they settle."""
    hermes_ort.load(toy_dir).close()
    hermes_ort.load(toy_dir).close()
    assert len(hashed) == 2 * len(hermes_ort.load_manifest(toy_dir).block_files())


def test_read_only_model_dir_caches_in_the_user_cache(toy_dir, tmp_path, settled, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == toy_dir else real_access(p, mode)
    )
    hermes_ort.load(toy_dir).close()
    assert not (toy_dir / "verified.json").exists()
    (cached,) = (tmp_path / "cache" / "hermes-ort").glob("verified-model-*.json")
    assert json.loads(cached.read_text())["files"]


# -- hostile directories -------------------------------------------------------------------------
def _point_at(model_dir: Path, block: str, location: str) -> Path:
    """Rewrite a block's external data locations and make the manifest agree."""
    onnx = pytest.importorskip("onnx")  # not on the emulated board: its fixtures are prebuilt
    path = model_dir / "blocks" / f"{block}.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))
    _reseal(model_dir, f"blocks/{block}.onnx")
    return path


@pytest.fixture
def ort_opened(monkeypatch):
    """Paths ONNX Runtime was asked to open."""
    import onnxruntime

    opened: list[str] = []
    real = onnxruntime.InferenceSession

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    return opened


@pytest.mark.parametrize(
    "location,message",
    [
        ("../../outside.data", "outside the model directory"),
        ("ABSOLUTE", "not a relative file path"),
        ("link.data", "outside the model directory"),  # a symlink in blocks/ to a file outside
        ("*/_ORT_MEM_ADDR_/*", "not a relative file path"),  # ORT: data at a memory address
        ("layer_02.data", "the manifest does not list"),  # inside, but another block's file
        ("nothing.data", "not a regular file"),
    ],
)
def test_external_data_escaping_the_model_dir_is_refused(
    toy_dir, tmp_path, ort_opened, location, message
):
    outside = tmp_path / "outside.data"
    shutil.copyfile(toy_dir / "blocks" / "layer_01.data", outside)
    (toy_dir / "blocks" / "link.data").symlink_to(outside)
    location = str(outside) if location == "ABSOLUTE" else location
    onnx_path = _point_at(toy_dir, "layer_01", location)
    with pytest.raises(hermes_ort.IntegrityError, match=message):
        hermes_ort.load(toy_dir)
    with pytest.raises(hermes_ort.IntegrityError, match=message):  # the session factory too
        create_session(onnx_path, STREAMING, allowed=[toy_dir / "blocks" / "layer_01.data"])
    assert ort_opened == []


def test_session_factory_confines_external_data_without_a_file_list(toy_dir, tmp_path, ort_opened):
    """The profiler opens blocks with no file list: the model directory (found by its manifest)
    still bounds what ORT may read, and any other file of it is accepted."""
    shutil.copyfile(toy_dir / "blocks" / "layer_01.data", tmp_path / "outside.data")
    inside = _point_at(toy_dir, "layer_01", "layer_02.data")
    create_session(inside, STREAMING)  # the toy's layers all have the same shapes
    outside = _point_at(toy_dir, "layer_02", "../../outside.data")
    with pytest.raises(hermes_ort.IntegrityError, match="outside the model directory"):
        create_session(outside, STREAMING)
    assert ort_opened == [str(inside)]


def test_a_damaged_onnx_that_cannot_be_parsed_is_refused(toy_dir):
    path = toy_dir / "blocks" / "layer_00.onnx"
    path.write_bytes(path.read_bytes()[:-7])
    _reseal(toy_dir, "blocks/layer_00.onnx")
    with pytest.raises(hermes_ort.IntegrityError, match="not an ONNX file this runtime can check"):
        hermes_ort.load(toy_dir)


def test_symlinked_block_directory_outside_is_refused(toy_dir, tmp_path):
    shutil.move(toy_dir / "blocks", tmp_path / "blocks")
    (toy_dir / "blocks").symlink_to(tmp_path / "blocks")
    with pytest.raises(hermes_ort.IntegrityError, match="outside the model directory"):
        hermes_ort.load(toy_dir, verify="size")


def test_a_fifo_for_a_block_file_is_refused_without_hanging(toy_dir):
    victim = toy_dir / "blocks" / "layer_00.data"
    victim.unlink()
    os.mkfifo(victim)  # opening it for reading would wait for a writer forever
    errors: list[BaseException] = []

    def load():
        try:
            hermes_ort.load(toy_dir)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "load() hung on a FIFO"
    assert isinstance(errors[0], hermes_ort.IntegrityError) and "not a regular file" in str(
        errors[0]
    )


def test_nothing_in_the_model_dir_is_executed_or_unpickled(toy_dir, tmp_path):
    """Files a careless runtime might unpickle, import or load sit in the directory; loading,
    profiling and running it touch none of them (the marker file would appear)."""
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    bomb = pickle.dumps(Payload())
    for name in ("profile.json", "verified.json", "model.pkl", "blocks/layer_00.pkl"):
        (toy_dir / name).write_bytes(bomb)
    for name in ("sitecustomize.py", "hermes_ort.py", "blocks/__init__.py"):
        (toy_dir / name).write_text(f"open({str(marker)!r}, 'w')\n")
    manifest = json.loads((toy_dir / "manifest.json").read_text())
    manifest["custom_op_library"] = "blocks/evil.so"  # unknown fields are ignored, never loaded
    (toy_dir / "manifest.json").write_text(json.dumps(manifest))
    with hermes_ort.load(toy_dir, profile=True) as model:
        model.run(model.sample_inputs())
    assert json.loads((toy_dir / "profile.json").read_text())  # measured again, as JSON
    assert not marker.exists()


def test_the_runtime_has_no_pickle_or_eval():
    banned = re.compile(
        r"pickle|marshal|shelve|(?<![.\w])(eval|exec|compile)\(|allow_pickle=True|"
        r"register_custom_ops_library|yaml"
    )
    runtime = (p for p in (ROOT / "hermes_ort").rglob("*.py") if "export" not in p.parts)
    for path in sorted(runtime):
        found = banned.search(path.read_text())
        assert not found, f"{path.relative_to(ROOT)} uses {found.group(0)}"
    assert "import json" in (ROOT / "hermes_ort" / "core" / "manifest.py").read_text()


# -- the wire-format reader ----------------------------------------------------------------------
def _leads_to_tensor(desc, seen=()) -> bool:
    if desc.name == "TensorProto":
        return True
    return any(
        f.message_type is not None
        and f.message_type.name not in seen
        and _leads_to_tensor(f.message_type, (*seen, desc.name))
        for f in desc.fields
    )


def test_schema_lists_every_field_that_can_hold_a_tensor():
    """Checked against onnx's own descriptors: a new onnx.proto field that can hold a tensor
    fails here first."""
    onnx = pytest.importorskip("onnx")
    for kind, fields in _SCHEMA.items():
        desc = getattr(onnx, kind).DESCRIPTOR
        for number, child in fields.items():
            assert desc.fields_by_number[number].message_type.name in (
                child,
                "StringStringEntryProto",
            )
        if kind == "TensorProto":
            assert desc.fields_by_name["external_data"].number in fields
            continue
        leading = {
            f.number
            for f in desc.fields
            if f.message_type is not None and _leads_to_tensor(f.message_type)
        }
        assert leading == set(fields), kind


def _external(tensor, location: str):
    import onnx

    onnx.external_data_helper.set_external_data(tensor, location=location, offset=0, length=4)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    return tensor


def test_locations_are_found_wherever_a_tensor_can_be():
    onnx = pytest.importorskip("onnx")
    h = onnx.helper

    def t(name: str, location: str):
        return _external(onnx.numpy_helper.from_array(np.zeros(1, np.float32), name), location)

    vi = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])

    def branch(location: str):
        return h.make_graph(
            [h.make_node("Identity", ["c"], ["y"])], "b", [], [vi], [t("c", location)]
        )

    sparse = h.make_sparse_tensor(t("sv", "sparse_values.bin"), t("si", "sparse_indices.bin"), [4])
    nodes = [
        h.make_node("Constant", [], ["k"], value=t("k", "constant.bin")),
        h.make_node(
            "If", ["cond"], ["y"], then_branch=branch("then.bin"), else_branch=branch("else.bin")
        ),
        h.make_node("Identity", ["x"], ["z"], tensors=[t("a", "attr_list.bin")]),
    ]
    graph = h.make_graph(nodes, "g", [vi], [vi], [t("w", "init.bin")], sparse_initializer=[sparse])
    func = onnx.FunctionProto(
        name="f",
        domain="d",
        node=[h.make_node("Constant", [], ["o"], value=t("fk", "function.bin"))],
    )
    model = h.make_model(graph, functions=[func])
    meta = model.graph.initializer[0].metadata_props.add()  # an entry that is not external data
    meta.key, meta.value = "location", "metadata.bin"
    assert set(locations_in_bytes(model.SerializeToString())) == {
        "constant.bin",
        "then.bin",
        "else.bin",
        "attr_list.bin",
        "init.bin",
        "sparse_values.bin",
        "sparse_indices.bin",
        "function.bin",
    }


def test_toy_blocks_name_their_data_file(toy_dir):
    manifest = hermes_ort.load_manifest(toy_dir)
    for block in manifest.blocks:
        assert external_locations(toy_dir / block.path) == (Path(block.files[1].path).name,)


def test_unreadable_bytes_raise_wire_errors():
    assert locations_in_bytes(b"\x08\x08\x3a\x00") == ()  # ir_version 8, an empty graph
    bad = {
        "field past the end": b"\x3a\x05\x01",  # graph (7), 5 bytes long, 1 given
        "truncated varint in a graph": b"\x3a\x02\x80\x80",
        "overlong varint": b"\x08" + b"\xff" * 10 + b"\x01",
        "group": b"\x3b",  # graph as a start-group: never in ONNX
    }
    for what, data in bad.items():
        with pytest.raises(WireError):
            locations_in_bytes(data)
            pytest.fail(what)
