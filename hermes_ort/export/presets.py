"""Named model shapes in `hermes_ort/presets/NAME.json`, built with seeded random weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes_ort.export.errors import ExportError

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"  # package data: ships in the wheel
NOISE_STD = 0.02  # added to every parameter, so no two initializers are equal


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    config_class: str
    model_class: str
    task: str
    config: dict[str, Any]


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name: str) -> Preset:
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        names = ", ".join(available_presets()) or "(none)"
        raise ExportError(f"unknown preset '{name}'; available presets: {names}")
    try:
        data = json.loads(path.read_text())
        return Preset(
            name=name,
            family=data["family"],
            config_class=data["config_class"],
            model_class=data["model_class"],
            task=data["task"],
            config=data["config"],
        )
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"preset file '{path}' is malformed: {e!r}") from None


def build_random_model(preset: Preset, seed: int):
    """The preset's transformers model with its default init plus N(0, 0.02) noise on every
    parameter (default init makes biases 0 and LayerNorms 1: identical initializers that the ONNX
    exporter folds together)."""
    import torch
    import transformers

    try:
        config_cls = getattr(transformers, preset.config_class)
        model_cls = getattr(transformers, preset.model_class)
    except AttributeError as e:
        raise ExportError(f"preset '{preset.name}': transformers has no {e.name}") from None
    config = config_cls(**preset.config)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for p in model.parameters():  # tied parameters appear once
            p.add_(torch.randn_like(p), alpha=NOISE_STD)
    return model.eval()
