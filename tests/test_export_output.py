"""What `hermes-ort export` prints: with --quiet nothing but errors; without it, its progress lines
and a summary that names its sizes as bytes on disk, never ONNX Runtime's quantizer logs (one line
per node: ~240 lines for a 3-layer model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

from hermes_ort.core.manifest import load_manifest
from hermes_ort.core.units import format_bytes

pytest.importorskip("torch", reason="exporting needs torch (not on the aarch64 board)")

ROOT = Path(__file__).resolve().parents[1]
INT4 = ["--preset", "tiny-llama", "--quantize", "int4", "--quant-block-size", "16"]


def _export(out: Path, *args: str) -> subprocess.CompletedProcess:
    """A fresh process: the quantizer's import configures logging only once per process."""
    cmd = [sys.executable, "-m", "hermes_ort.export", *INT4, "--seq-len", str(fx.SEQ_LEN)]
    return subprocess.run(
        [*cmd, "--out", str(out), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_quiet_prints_nothing_but_errors(tmp_path):
    done = _export(tmp_path / "m", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""
    failed = _export(tmp_path / "n", "--quiet", "--accuracy-floor", "0.99999")
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith("hermes-ort export: error: verification failed")
    assert failed.stderr.count("\n") == 1, failed.stderr


def _on_disk(model_dir: Path, paths) -> int:
    return sum(os.stat(model_dir / p).st_blocks * 512 for p in paths)


def _near(printed: str, disk: int, files: int) -> bool:
    """Whether a printed size ("372.7 KB") is `disk` bytes, give or take its rounding and one
    4 KiB extent block per file (ext4 adds those to a file with holes at writeback, which may come
    after the summary was printed)."""
    value, unit = printed.split()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit]
    return abs(float(value) * scale - disk) <= 0.05 * scale + 4096 * files


def test_progress_and_bytes_on_disk_without_the_quantizer_logs(tmp_path):
    done = _export(tmp_path / "m")
    assert done.returncode == 0, done.stderr
    assert "building preset 'tiny-llama'" in done.stderr
    assert "verified (int4): 'logits' cosine" in done.stderr
    for noise in ("matmul_nbits_quantizer", "[INFO]", "WARNING", "opset"):
        assert noise not in done.stderr + done.stdout, noise
    model_dir = tmp_path / "m"
    m = load_manifest(model_dir)
    total = next(line for line in done.stdout.splitlines() if "blocks on disk: " in line)
    printed = total.split("blocks on disk: ")[1].split(" (")[0].split(";")[0]
    assert _near(printed, _on_disk(model_dir, m.block_files()), len(m.block_files())), total
    # the 64 KiB-aligned data files are sparse (here): the manifest's bytes are their length
    if _on_disk(model_dir, m.block_files()) < m.blocks_bytes:
        assert f"(file length {format_bytes(m.blocks_bytes)}" in total
    layer = next(b for b in m.blocks if b.name == "layer_00")
    row = next(line.split() for line in done.stdout.splitlines() if "layer_00" in line)
    files = [f.path for f in layer.files]
    assert _near(" ".join(row[-2:]), _on_disk(model_dir, files), len(files)), row
