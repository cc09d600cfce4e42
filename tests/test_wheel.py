"""The wheel as a user gets it: it holds the runtime, the exporter (`hermes_ort.export`) and the
presets, never the benchmarks or a top-level package another project may own; it needs only
onnxruntime, numpy and psutil; and installed (not editable) in a fresh virtual environment, away
from this checkout, `hermes-ort --version`, `export --preset`, `run` and `python -m hermes_ort`
work. The fresh environment borrows the already installed dependencies (torch for the export)
through a .pth file rather than downloading them again; the checkout itself is never on its path."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import hermes_ort

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("HERMES_ARM_BOARD") == "1", reason="the emulated board has no pip or network"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0 and "No matching distribution" in r.stderr:
        pytest.skip(f"no build backend reachable: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    (path,) = out.glob("hermes_ort-*.whl")
    return path


def test_the_wheel_holds_the_package_and_its_presets_and_needs_three_packages(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(z.read(n).decode() for n in names if n.endswith("METADATA"))
    tops = {n.split("/")[0] for n in names}
    assert tops == {"hermes_ort", next(t for t in tops if t.endswith(".dist-info"))}
    assert not [n for n in names if "bench" in n.split("/")]
    assert "hermes_ort/export/pipeline.py" in names
    presets = {Path(n).stem for n in names if n.startswith("hermes_ort/presets/")}
    assert {"tiny-bert", "bert-base", "tiny-llama"} <= presets
    required = [
        line.split(":", 1)[1].strip()
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert sorted(r.split(">")[0].split("=")[0].strip() for r in required) == [
        "numpy",
        "onnxruntime",
        "psutil",
    ]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its bin/ directory."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies this environment already has (torch & co. for the export), not the
    # checkout: its editable finder sits in a .pth of that directory, which is not processed
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    deps |= set(site.getsitepackages())
    (Path(purelib) / "borrowed-deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    r = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return venv / "bin"


def _run(bin_dir: Path, *args: str, cwd: Path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    r = subprocess.run([*args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}: {r.stdout}\n{r.stderr}"
    return r.stdout


def test_the_installed_wheel_exports_and_runs_away_from_the_checkout(installed, tmp_path):
    where = _run(
        installed,
        str(installed / "python"),
        "-c",
        "import hermes_ort; print(hermes_ort.__file__)",
        cwd=tmp_path,
    )
    assert not Path(where.strip()).is_relative_to(ROOT), where  # the wheel's copy, not ours
    version = _run(installed, str(installed / "hermes-ort"), "--version", cwd=tmp_path)
    assert hermes_ort.__version__ in version and version.endswith("\n")
    assert _run(installed, str(installed / "python"), "-m", "hermes_ort", "--version", cwd=tmp_path)
    model = tmp_path / "tiny-bert"
    _run(
        installed,
        str(installed / "hermes-ort"),
        "export",
        "--preset",
        "tiny-bert",
        "--out",
        str(model),
        "--quiet",
        cwd=tmp_path,
    )
    out = _run(
        installed,
        str(installed / "hermes-ort"),
        "run",
        str(model),
        "--budget",
        "min",
        cwd=tmp_path,
    )
    assert "tiny-bert" in out or "pipeload" in out, out
