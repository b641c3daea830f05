"""What the web UI's browser tests share (tests/test_ui_browser.py drives Chromium,
tests/test_ui_firefox.py Firefox): a real server with the test workflows, the echo model and
the `gated` workflow composed, whose `hold` step runs until the test opens its gate."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from gates import GateStep
from serverutil import serve_app
from test_ui_pages import ECHO, KEY, write_workflows

from engine.config import Settings
from server.app import create_app

# `say` answers at once through echo (a token stream), `hold` waits at the gate the
# input names, `done` follows.
GATED = {
    "id": "gated",
    "name": "Gated",
    "description": "A quick model step, then one held until the test lets it go",
    "models": {"generation": {"type": "lm"}},
    "input_schema": {
        "type": "object",
        "properties": {"text": {"type": "string"}, "gate": {"type": "string"}},
        "required": ["text", "gate"],
    },
    "steps": [
        {
            "step_id": "say",
            "type": "model_call",
            "model_id": "{{ models.generation }}",
            "operation": "chat",
            "input": {"messages": [{"role": "user", "content": "{{ input.text }}"}]},
        },
        # After `say` (it reads say's output), so the graph has two columns.
        {
            "step_id": "hold",
            "type": "test_gate",
            "gate": "{{ input.gate if steps.say.output else '' }}",
        },
        {"step_id": "done", "type": "template", "value": "{{ steps.say.output.content }}"},
    ],
    "output": {"said": "{{ steps.done.output }}", "gate": "{{ steps.hold.output }}"},
}


@contextmanager
def serving(tmp: Path, **extra: Any) -> Iterator[httpx.Client]:
    """A real server with the test workflows, the echo model and `gated` composed."""
    write_workflows(tmp / "wf")
    settings = Settings(
        data_dir=tmp,
        workflows_dir=tmp / "wf",
        startup_models=[ECHO],
        log_level="warning",
        rate_limit_enabled=False,
        **extra,
    )
    headers = {"Authorization": f"Bearer {KEY}"} if "api_keys" in extra else {}
    with (
        serve_app(create_app(settings)) as running,
        httpx.Client(base_url=running.base_url, timeout=60.0, headers=headers) as client,
    ):
        running.app.state.engine.steps.register(GateStep)
        composed = client.post("/api/fusion/compose", json=GATED)
        assert composed.status_code == 201, composed.text
        yield client


@pytest.fixture(scope="module", name="server")
def server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """`server`: one server for a test module (import `server_fixture` into the module)."""
    with serving(tmp_path_factory.mktemp("ui-browser")) as client:
        yield client


def node(step: str, status: str) -> str:
    """The CSS selector of a step's node in the run page's graph, in that status."""
    return f'svg.dag g.node.status-{status}[data-step="{step}"]'
