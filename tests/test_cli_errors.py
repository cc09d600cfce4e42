"""Every subcommand, given bad input, exits with a status and one line that names the problem;
never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import hermes_ort


def hermes(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hermes_ort", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args,status,message",
    [
        (["run", "{missing}"], 1, "does not exist"),
        (["run", "{text}"], 1, "is a file, not a model directory"),
        (["run", "{toy}", "--budget", "lots"], 2, "not a byte size"),
        (["run", "{toy}", "--budget", "1MB"], 1, "smallest workable budget"),
        (["run", "{toy}", "--input", "{text}"], 1, "is not an .npz of named arrays"),
        (["run", "{toy}", "--input", "{npy}"], 1, "holds one array, expected an .npz"),
        (["run", "{toy}", "--input", "{missing}"], 1, "does not exist"),
        (["run", "{toy}", "--input", "{wrong_npz}"], 1, "unknown input(s) ['tokens']"),
        (["run", "{toy}", "--repeat", "0"], 2, "--repeat must be at least 1"),
        (["run", "{toy}", "--save-outputs", "{missing}/out.npz"], 1, "cannot write --save-outputs"),
        (["run", "{toy}", "--window", "0"], 2, "window must be a whole number of at least 1"),
        (["plan", "{toy}", "--no-profile", "--budget", "0"], 2, "byte size must be positive"),
        (["plan", "{missing}"], 1, "does not exist"),
        (["info", "{missing}"], 1, "does not exist"),
        (["info", "{damaged}", "--verify"], 1, "does not match its sha256"),
        (["profile", "{missing}"], 1, "does not exist"),
        (["profile", "{toy}", "--seq-len", "0"], 2, "--seq-len must be at least 1"),
        (["generate", "{missing}", "--ids", "1,2"], 1, "does not exist"),
        (["generate", "{toy}", "--ids", "1,x"], 1, "--ids must be comma-separated integers"),
        (["generate", "{toy}", "--ids", "1,2"], 1, "has no KV cache inputs"),
        (["generate", "{toy}", "--prompt", "hi"], 1, "no tokenizer.json"),
        (["generate", "{toy}", "--ids", "1", "--max-new-tokens", "0"], 2, "at least 1"),
        (["export", "--preset", "no-such", "--out", "{tmp}/m"], 1, "unknown preset 'no-such'"),
        (["export", "--model", "{missing}", "--out", "{tmp}/m"], 1, "not found"),
    ],
)
def test_bad_input_is_one_line(toy_dir, tmp_path, args, status, message):
    (tmp_path / "not.npz").write_text("hello")
    np.save(tmp_path / "one.npy", np.zeros(3))
    np.savez(tmp_path / "wrong.npz", tokens=np.zeros((1, 3), np.int64))
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(toy_dir, damaged)
    data = damaged / "full" / "model.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    names = {
        "toy": toy_dir,
        "missing": tmp_path / "missing",
        "text": tmp_path / "not.npz",
        "npy": tmp_path / "one.npy",
        "wrong_npz": tmp_path / "wrong.npz",
        "damaged": damaged,
        "tmp": tmp_path,
    }
    r = hermes(*[a.format(**names) for a in args])
    line = one_line(r)
    assert r.returncode == status and line.startswith("hermes-ort"), r.stderr
    assert message in line


def test_an_unknown_strategy_is_refused_before_any_file_is_hashed(toy_dir, monkeypatch):
    from hermes_ort.streaming import integrity

    hashed = []
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p))
    with pytest.raises(hermes_ort.OptionError, match="unknown strategy 'nonsense'"):
        hermes_ort.load(toy_dir, strategy="nonsense")
    for bad in (dict(objective="fast"), dict(load_path="disk"), dict(verify="never")):
        with pytest.raises(hermes_ort.OptionError):
            hermes_ort.load(toy_dir, **bad)
    assert hashed == [] and not (toy_dir / "verified.json").exists()


def test_info_verify_checks_every_listed_file(toy_dir):
    """The whole-model files too (both of them, when the manifest lists an mmap copy)."""
    manifest = json.loads((toy_dir / "manifest.json").read_text())
    manifest["full_model_mmap"] = manifest["full_model"]
    (toy_dir / "manifest.json").write_text(json.dumps(manifest))
    r = hermes("info", str(toy_dir), "--verify")
    files = len(hermes_ort.load_manifest(toy_dir).all_files())
    assert r.returncode == 0 and f"{files} files present and their sha256 match" in r.stdout
    mmap = manifest["full_model_mmap"]["files"][-1]["path"]
    raw = bytearray((toy_dir / mmap).read_bytes())
    raw[-1] ^= 1
    (toy_dir / mmap).write_bytes(bytes(raw))
    assert f"'{mmap}' does not match its sha256" in one_line(
        hermes("info", str(toy_dir), "--verify")
    )
