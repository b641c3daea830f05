"""The web UI in a real browser: Debian's Chromium, headless, driven by the `playwright`
package (scripts/bootstrap.sh installs the browser when it can; no browser is downloaded).
A real server serves the echo model, a tiny MLX model that generates until stopped, and
test workflows. Every wait is playwright's bounded wait for a DOM state, never a sleep.

FUSION_UI_SCREENSHOTS=DIR also saves the run and workflows pages' screenshots there
(docs/ui/*.png are made so)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from gates import GATES
from test_ui_pages import KEY, SCRIPT
from ui_helpers import node, server_fixture, serving  # noqa: F401 - a fixture

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

CHROMIUM = os.environ.get("FUSION_CHROMIUM") or shutil.which("chromium")
pytestmark = [
    pytest.mark.e2e,  # a real server (started by ui_helpers, which conftest does not see)
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium: install Debian's `chromium` (scripts/bootstrap.sh does as root) "
        "or set FUSION_CHROMIUM to a Chromium executable",
    ),
]
WAIT_MS = 30_000  # a bound on each wait for the page to reach a state
SHOTS = os.environ.get("FUSION_UI_SCREENSHOTS")


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
