"""Clear errors, and no half-written model directory after a failed or interrupted export."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

from hermes_ort.export import storage, verify
from hermes_ort.export.errors import ExportError
from hermes_ort.export.stack import find_layer_stack

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_preset_lists_the_available_ones(tmp_path, capsys):
    assert fx.export_cli(tmp_path / "m", "--preset", "bert-huge") == 1
    err = capsys.readouterr().err
    assert "unknown preset 'bert-huge'" in err
    for name in ("bert-base", "gpt2-xl", "tiny-bert", "tiny-gpt2", "tiny-vit", "vit-large"):
        assert name in err
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_directory(tmp_path, capsys):
    assert fx.export_cli(tmp_path / "m", "--model", str(tmp_path / "no-such-ckpt")) == 1
    assert (
        f"checkpoint directory '{tmp_path / 'no-such-ckpt'}' not found" in capsys.readouterr().err
    )
    assert list(tmp_path.iterdir()) == []


def test_hub_id_when_offline_fails_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fx.export_cli(tmp_path / "m", "--model", "some-org/some-model") == 1
    err = capsys.readouterr().err
    assert "'some-org/some-model' not found" in err and "offline" in err


def test_directory_without_config_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    assert fx.export_cli(tmp_path / "m", "--model", str(tmp_path / "ckpt")) == 1
    assert "has no config.json" in capsys.readouterr().err


def test_uncuttable_architecture_is_named(tmp_path, capsys):
    """ALBERT shares one layer across its depth: there is no per-layer module list to cut along."""
    from transformers import AlbertConfig, AlbertModel

    config = AlbertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        embedding_size=16,
        vocab_size=100,
    )
    AlbertModel(config).save_pretrained(tmp_path / "albert")
    assert fx.export_cli(tmp_path / "m", "--model", str(tmp_path / "albert")) == 1
    assert "unsupported architecture 'AlbertModel'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["albert"]


def test_model_without_repeated_layers_is_unsupported():
    from torch import nn

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))

    with pytest.raises(ExportError, match="unsupported architecture 'Mlp'.*no repeated layer list"):
        find_layer_stack(Mlp())


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert fx.export_cli(out, "--preset", "tiny-gpt2") == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert fx.export_cli(out, "--preset", "tiny-gpt2", "--force") == 1  # not a model directory
    assert "not a hermes-ort model directory" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_verification_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(verify, "TOLERANCE_FP32", -1.0)  # every comparison fails
    assert fx.export_cli(tmp_path / "m", "--preset", "tiny-gpt2") == 1
    assert "verification failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    real = storage.optimise_block
    calls = []

    def interrupt_on_third_block(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(storage, "optimise_block", interrupt_on_third_block)
    assert fx.export_cli(tmp_path / "m", "--preset", "tiny-bert") == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_after_success(tmp_path, monkeypatch):
    out = tmp_path / "m"
    assert fx.export_cli(out, "--preset", "tiny-gpt2") == 0
    before = (out / "manifest.json").read_text()

    with monkeypatch.context() as m:
        m.setattr(verify, "TOLERANCE_FP32", -1.0)
        assert fx.export_cli(out, "--preset", "tiny-gpt2", "--seed", "1", "--force") == 1
    assert (out / "manifest.json").read_text() == before  # the old model is untouched
    assert fx.leftovers(tmp_path) == []

    assert fx.export_cli(out, "--preset", "tiny-gpt2", "--seed", "1", "--force") == 0
    after = json.loads((out / "manifest.json").read_text())
    assert after["source"] == {"kind": "preset", "name": "tiny-gpt2", "seed": 1}
    assert (
        after["blocks"][1]["files"][1]["sha256"]
        != json.loads(before)["blocks"][1]["files"][1]["sha256"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_python_m_export_runs_the_cli(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hermes_ort.export",
            "--preset",
            "nope",
            "--out",
            str(tmp_path / "m"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "available presets: bert-base, bert-large, gpt2" in proc.stderr


# -- checkpoints with files missing or damaged ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert_checkpoint(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("ckpt") / "bert"
    config = BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    BertModel(config).save_pretrained(path, max_shard_size="40KB")  # several shards + an index
    return path


def _damaged_copy(src: Path, dst: Path, damage) -> Path:
    shutil.copytree(src, dst)
    damage(dst, sorted(dst.glob("model-*.safetensors")))
    return dst


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda d, shards: (
                [s.unlink() for s in shards] + [(d / "model.safetensors.index.json").unlink()]
            ),
            "no file named .*model.safetensors",
        ),
        (lambda d, shards: shards[1].unlink(), f"No such file or directory: .*{'model-00002-of-'}"),
        (
            lambda d, shards: shards[0].write_bytes(shards[0].read_bytes()[:-100]),
            "model-00001-of-.*is truncated or damaged",
        ),
        (lambda d, shards: shards[0].write_bytes(b"\xff" * 64), "model-00001-of-.*is damaged"),
    ],
    ids=["no-weights", "missing-shard", "truncated-shard", "garbage-shard"],
)
def test_checkpoint_with_files_missing_or_damaged(
    tiny_bert_checkpoint, tmp_path, capsys, damage, message
):
    ckpt = _damaged_copy(tiny_bert_checkpoint, tmp_path / "ckpt", damage)
    assert fx.export_cli(tmp_path / "m", "--model", str(ckpt)) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# -- a full disk ---------------------------------------------------------------------------------
def test_disk_full_is_named_and_nothing_is_left(tmp_path, capsys, monkeypatch):
    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(storage, "optimise_block", no_space)
    assert fx.export_cli(tmp_path / "m", "--preset", "tiny-bert") == 1
    err = capsys.readouterr().err
    assert "no space left on the device holding" in err and "nothing was kept" in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1.5 MB tmpfs (root only): the tiny-bert export (1.9 MB) fills it partway through."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or 'not root'}")
    try:
        yield mount
    finally:  # busy if a failed export still maps a deleted file: its space would not be back
        busy = subprocess.run(["umount", str(mount)], capture_output=True, text=True)
        if busy.returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)
            pytest.fail(f"the tmpfs is still in use after the export: {busy.stderr.strip()}")


def test_a_really_full_disk_is_named_and_nothing_is_left(tiny_tmpfs, capsys):
    """Whatever writer hits the full disk (Python, protobuf, ONNX Runtime: the latter says
    "Protobuf serialization failed"), the error says the disk is full."""
    assert fx.export_cli(tiny_tmpfs / "m", "--preset", "tiny-bert") == 1
    err = capsys.readouterr().err
    assert "no space left on the device holding" in err and "Traceback" not in err
    assert list(tiny_tmpfs.iterdir()) == []


# -- interrupted from outside --------------------------------------------------------------------
def _export_process(out: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "hermes_ort.export",
        "--preset",
        "tiny-bert",
        "--out",
        str(out),
        "--quiet",
        "--seq-len",
        str(fx.SEQ_LEN),
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_temporary_dir(parent: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not fx.leftovers(parent):
        assert proc.poll() is None and time.monotonic() < deadline, "the export never started"
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signalled_export_leaves_nothing(tmp_path, sig):
    proc = _export_process(tmp_path / "m")
    try:
        _wait_for_temporary_dir(tmp_path, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted; nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_export_are_cleaned_by_the_next(tmp_path, capsys):
    """SIGKILL (the OOM killer) runs no cleanup: the next export of the same output removes the
    dead process's temporary directory, and puts back a model it had swapped out."""
    proc = _export_process(tmp_path / "m")
    try:
        _wait_for_temporary_dir(tmp_path, proc)
        proc.kill()
    finally:
        proc.wait(timeout=60)
    (stale,) = fx.leftovers(tmp_path)
    previous = tmp_path / f".m.old-{proc.pid}-0000"  # killed while swapping in a new model
    previous.mkdir()
    (previous / "manifest.json").write_text("{}")
    mine = tmp_path / f".m.tmp-{os.getpid()}-live"  # a running export's: kept
    mine.mkdir()
    assert fx.export_cli(tmp_path / "m", "--preset", "tiny-bert") == 1  # the model is back
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "m" / "manifest.json").read_text() == "{}"
    assert fx.leftovers(tmp_path) == [mine.name] and stale != mine.name
