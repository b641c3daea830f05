"""Session-wide fixtures: tiny synthetic MLX models, built once per test session; and the
markers `unit` and `e2e`, set on every test from what it uses (unless its module marks it),
so `pytest -m unit` is the fast loop (no model, no server) and `pytest -m e2e` the rest."""

from __future__ import annotations

import pytest
from model_fixtures import (  # noqa: F401
    minilm_dir,
    tiny_embedder_dir,
    tiny_lm_dir,
    tiny_vlm_dir,
    tiny_whisper_dir,
)

_MODEL_FIXTURES = frozenset(
    {"minilm_dir", "tiny_embedder_dir", "tiny_lm_dir", "tiny_vlm_dir", "tiny_whisper_dir"}
)
# A test module that imports one of these starts a real server (or `fusion serve`).
_SERVER_HELPERS = ("serve_app", "serve_factory_process", "serve_cli_process", "running_server")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("e2e") or item.get_closest_marker("unit"):
            continue  # marked by its module (a test that builds a venv, say)
        module = getattr(item, "module", None)
        starts_server = module is not None and any(
            hasattr(module, name) for name in _SERVER_HELPERS
        )
        loads_models = bool(_MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ())))
        item.add_marker(pytest.mark.e2e if starts_server or loads_models else pytest.mark.unit)
