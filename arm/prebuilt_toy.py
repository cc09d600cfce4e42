"""`tests/toy_model.py` for the emulated board, which has no `onnx`: serves the toy models that
arm/make_fixtures.py built with the real tests/toy_model.py on x86-64 (the same bytes: the toy model
is deterministic).

A pytest plugin (`pytest -p prebuilt_toy`, arm/ on PYTHONPATH): it is imported before the tests'
conftest, and puts itself in sys.modules as `toy_model`, so the existing tests run unchanged.
HERMES_TOY_DIR names the prebuilt directory (OUT_DIR/toy of make_fixtures.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

OPSET = 17
DEFAULTS = {"layers": 4, "hidden": 32, "vocab": 50, "seed": 0}  # tests/toy_model.py's


def _toy_dir() -> Path:
    path = os.environ.get("HERMES_TOY_DIR")
    if not path or not Path(path).is_dir():
        raise RuntimeError("prebuilt_toy: set HERMES_TOY_DIR to make_fixtures.py's OUT_DIR/toy")
    return Path(path)


def _key(layers: int, hidden: int, vocab: int, seed: int) -> str:
    return f"toy-L{layers}-H{hidden}-V{vocab}-S{seed}"


def write_toy_model(
    out: Path, layers: int = 4, hidden: int = 32, vocab: int = 50, seed: int = 0
) -> Path:
    """A copy of the prebuilt toy model with these parameters at `out`."""
    src = _toy_dir() / _key(layers, hidden, vocab, seed)
    if not src.is_dir():
        raise RuntimeError(
            f"prebuilt_toy: no prebuilt {src.name} in {src.parent}; arm/make_fixtures.py builds "
            "the variants it finds as literal write_toy_model(...) calls in tests/"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, out, dirs_exist_ok=True)
    return out


def _weights_for(model_dir: Path) -> dict[str, np.ndarray]:
    # the manifest names every file's sha256, so it identifies the variant
    manifest = (Path(model_dir) / "manifest.json").read_text()
    for src in sorted(p for p in _toy_dir().iterdir() if p.is_dir()):
        if (src / "manifest.json").read_text() == manifest:
            with np.load(src.with_name(src.name + ".weights.npz")) as npz:
                return dict(npz)
    raise RuntimeError(f"prebuilt_toy: '{model_dir}' is not one of the prebuilt toy models")


def reference_logits(model_dir: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """As tests/toy_model.py: the toy model computed in numpy from its weights (saved on x86)."""
    w = _weights_for(model_dir)
    from toy_forward import toy_forward  # tests/ is on sys.path once pytest has started

    return toy_forward(w, feeds)


def pytest_report_header(config) -> str:
    variants = sorted(p.name for p in _toy_dir().iterdir() if p.is_dir())
    return f"toy_model: prebuilt on x86-64 ({json.dumps(variants)})"


sys.modules.setdefault("toy_model", sys.modules[__name__])
