"""Session-wide fixtures: tiny synthetic MLX models, built once per test session."""

from model_fixtures import (  # noqa: F401
    minilm_dir,
    tiny_embedder_dir,
    tiny_lm_dir,
    tiny_vlm_dir,
    tiny_whisper_dir,
)
