"""The web UI in a real browser: Debian's Chromium, headless, driven by the `playwright`
package (scripts/bootstrap.sh installs the browser when it can; no browser is downloaded).
A real server serves the echo model, a tiny MLX model that generates until stopped, and
test workflows. Every wait is playwright's bounded wait for a DOM state, never a sleep.

FUSION_UI_SCREENSHOTS=DIR also saves the run and workflows pages' screenshots there
(docs/ui/*.png are made so)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from serverutil import serve_app
from test_ui_pages import ECHO, KEY, SCRIPT, write_workflows

from engine.config import Settings
from engine.steps.base import StepContext, StepPlugin
from server.app import create_app

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

CHROMIUM = os.environ.get("FUSION_CHROMIUM") or shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: install Debian's `chromium` (scripts/bootstrap.sh does as root) "
    "or set FUSION_CHROMIUM to a Chromium executable",
)
WAIT_MS = 30_000  # a bound on each wait for the page to reach a state
SHOTS = os.environ.get("FUSION_UI_SCREENSHOTS")


class Gates:
    """asyncio events on the server's loop, opened from the test's thread: a step held
    at a gate is running for as long as the test wants, so the page sees it change."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def event(self, name: str) -> asyncio.Event:
        """On the server's loop."""
        self._loop = asyncio.get_running_loop()
        return self._events.setdefault(name, asyncio.Event())

    def open(self, name: str) -> None:
        assert self._loop is not None, "no step has waited on a gate yet"
        self._loop.call_soon_threadsafe(lambda: self.event(name).set())


GATES = Gates()


class GateStep(StepPlugin):
    """Test-only: waits until the test opens gate `gate`; outputs its name."""

    type_name = "test_ui_gate"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"gate": {"type": "string"}},
        "required": ["gate"],
    }

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        await GATES.event(params["gate"]).wait()
        return params["gate"]


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
            "type": "test_ui_gate",
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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with serving(tmp_path_factory.mktemp("ui-browser")) as client:
        yield client


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root (CI's Debian machine), where Chromium's
        # sandbox refuses to start.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@contextmanager
def browsing(browser: Any, base_url: str) -> Iterator[Any]:
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))
    yield page
    context.close()
    assert errors == [], errors  # no script error, no alert from the run's content


@pytest.fixture
def page(browser: Any, server: httpx.Client) -> Iterator[Any]:
    with browsing(browser, str(server.base_url)) as page:
        yield page


def start_from_form(
    page: Any, workflow: str, fields: dict[str, str], models: dict[str, str]
) -> str:
    page.goto(f"/ui/workflows/{workflow}")
    for name, value in fields.items():
        page.fill(f'[name="input.{name}"]', value)
    for role, model in models.items():
        page.select_option(f'[name="model.{role}"]', model)
    page.click("#start")
    page.wait_for_url(re.compile(r"/ui/runs/wf-"))
    return str(page.url).rsplit("/", 1)[1]


def node(step: str, status: str) -> str:
    return f'svg.dag g.node.status-{status}[data-step="{step}"]'


def test_a_run_started_from_the_form_turns_green_live(page: Any) -> None:
    start_from_form(
        page, "gated", {"text": "tell me more", "gate": "green"}, {"generation": "echo"}
    )
    # The page was rendered while `hold` waits: what follows comes over the event stream.
    page.wait_for_selector(node("say", "completed"))
    page.wait_for_selector(node("hold", "running"))
    assert page.inner_text("#run-status") == "running"
    # say's tokens, replayed to this page (it joined after they were sent).
    tokens = page.locator('li.step[data-step="say"] pre.tokens')
    sync_api.expect(tokens).to_contain_text("tell me more")
    GATES.open("green")
    page.wait_for_selector(node("hold", "completed"))
    page.wait_for_selector(node("done", "completed"))
    page.wait_for_selector("#run-status.status-completed")
    page.wait_for_selector('li.step.status-completed[data-step="done"]')
    page.wait_for_selector('svg.timeline g.bar.status-completed[data-step="hold"]')
    sync_api.expect(page.locator("#run-result")).to_contain_text('"said": "tell me more"')
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / "run.png"), full_page=True)


def test_a_long_run_is_cancelled_from_its_page(page: Any) -> None:
    start_from_form(page, "gated", {"text": "never done", "gate": "never"}, {"generation": "echo"})
    page.wait_for_selector(node("hold", "running"))
    page.click("#cancel")
    page.wait_for_selector("#run-status.status-cancelled")
    page.wait_for_selector(node("hold", "cancelled"))
    sync_api.expect(page.locator("#cancel")).to_be_hidden()  # nothing left to cancel
    page.reload()  # as stored
    page.wait_for_selector(node("hold", "cancelled"))
    assert page.locator("#cancel").count() == 0


def test_a_failed_steps_error_opens_on_click(page: Any) -> None:
    start_from_form(page, "fragile", {"data": "{}"}, {})
    page.wait_for_selector("#run-status.status-failed")
    page.wait_for_selector(node("risky", "failed"))
    error = page.locator('li.step[data-step="risky"] > details.error')
    text = error.locator("pre")
    sync_api.expect(text).to_be_hidden()  # closed until clicked
    error.locator("summary").click()
    sync_api.expect(text).to_be_visible()
    sync_api.expect(text).to_contain_text("value")


def test_script_in_an_output_is_shown_as_text(page: Any) -> None:
    start_from_form(page, "greet", {"text": SCRIPT}, {"generation": "echo"})
    page.wait_for_selector("#run-status.status-completed")
    sync_api.expect(page.locator("#run-result")).to_contain_text(SCRIPT)
    # Only the page's own script: the output's became text (the fixture fails on a dialog).
    assert page.locator("script").count() == 1
    page.reload()
    sync_api.expect(page.locator("#run-result")).to_contain_text(SCRIPT)
    assert page.locator("script").count() == 1


def test_the_workflows_pages(page: Any) -> None:
    page.goto("/ui/workflows")
    page.click('a[href="/ui/workflows/gated"]')
    page.wait_for_selector('svg.dag g.node[data-step="hold"]')
    assert page.locator("svg.dag path.edge").count() == 2
    assert page.locator("form.start textarea#in-text").count() == 1
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / "workflow.png"), full_page=True)
        page.goto("/ui/workflows")
        page.screenshot(path=str(Path(SHOTS) / "workflows.png"), full_page=True)
        page.goto("/ui/runs")
        page.screenshot(path=str(Path(SHOTS) / "runs.png"), full_page=True)


def test_with_a_key_the_login_cookie_serves_pages_stream_and_cancel(
    browser: Any, tmp_path: Path
) -> None:
    with (
        serving(tmp_path, api_keys={"ui": KEY}) as keyed,
        browsing(browser, str(keyed.base_url)) as page,
    ):
        page.goto("/ui/workflows/gated")
        page.wait_for_url(re.compile(r"/ui/login\?next="))
        page.fill('[name="key"]', KEY)
        page.click('form[action="/ui/login"] button')
        page.wait_for_url(re.compile(r"/ui/workflows/gated$"))
        start_from_form(page, "gated", {"text": "keyed", "gate": "keyed"}, {"generation": "echo"})
        # The event stream and the cancel call reach the API with the cookie.
        page.wait_for_selector(node("hold", "running"))
        sync_api.expect(page.locator('li.step[data-step="say"] pre.tokens')).to_contain_text(
            "keyed"
        )
        page.click("#cancel")
        page.wait_for_selector("#run-status.status-cancelled")
