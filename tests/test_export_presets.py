"""The presets: every file is well formed and the full-size ones have the real models' shapes."""

from __future__ import annotations

import pytest

from hermes_ort.export.presets import available_presets, load_preset

# Parameter counts of the published models (millions).
REAL_SIZES_M = {
    "bert-base": 109.5,
    "bert-large": 335.1,
    "vit-base": 86.6,
    "vit-large": 304.3,
    "gpt2": 124.4,
    "gpt2-medium": 354.8,
    "gpt2-large": 774.0,
    "gpt2-xl": 1557.6,
    "tinyllama-1.1b": 1100.0,
    "llama-3.2-1b": 1235.8,
    "llama-2-7b": 6738.4,
    "qwen2.5-1.5b": 1543.7,
}
TINY = {"tiny-bert", "tiny-vit", "tiny-gpt2", "tiny-llama", "tiny-qwen2", "tiny-mistral"}


def test_the_promised_presets_exist():
    assert set(REAL_SIZES_M) | TINY <= set(available_presets())


@pytest.mark.parametrize("name", available_presets())
def test_preset_builds_with_its_shape(name):
    import torch
    import transformers

    preset = load_preset(name)
    assert preset.family in ("bert", "vit", "gpt2", "llama", "qwen2", "mistral")
    config = getattr(transformers, preset.config_class)(**preset.config)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = getattr(transformers, preset.model_class)(config)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    if name in REAL_SIZES_M:
        assert params_m == pytest.approx(REAL_SIZES_M[name], rel=0.01)
    else:
        assert params_m < 1.0  # a tiny test model
