"""The web UI in a real Firefox: Debian's `firefox-esr`, headless, driven over Marionette
(Firefox's own remote protocol) by Mozilla's `marionette_driver` client: playwright drives
only its own patched Firefox builds, and neither they nor geckodriver can be downloaded
here. scripts/bootstrap.sh installs firefox-esr when it can; FUSION_FIREFOX names another
Firefox executable. The same real server as tests/test_ui_browser.py (tests/ui_helpers.py).

Firefox runs in a profile of its own in a temporary folder, Marionette on a port Firefox
picks (`marionette.port` 0; it writes the port to the profile's MarionetteActivePort). The
module fixture's cleanup (a finally around all of it) ends Firefox's process group and
removes the profile, whatever failed. Every wait polls the page for a state with a
deadline (marionette_driver's Wait), never a sleep, and each test has a timeout of its own."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gates import GATES
from test_ui_pages import KEY, SCRIPT
from ui_helpers import node, server_fixture, serving  # noqa: F401 - the `server` fixture

marionette = pytest.importorskip(
    "marionette_driver.marionette",
    reason="marionette_driver is not installed (the dev extra has it: pip install -e '.[dev]')",
)
from marionette_driver import errors  # noqa: E402 - only once the client is known present
from marionette_driver.by import By  # noqa: E402
from marionette_driver.wait import Wait  # noqa: E402

FIREFOX = os.environ.get("FUSION_FIREFOX") or shutil.which("firefox-esr") or shutil.which("firefox")
pytestmark = [
    pytest.mark.e2e,  # a real server (started by ui_helpers, which conftest does not see)
    pytest.mark.timeout(120),  # a test that hangs fails instead of holding the suite
    pytest.mark.skipif(
        FIREFOX is None,
        reason="no Firefox: install Debian's `firefox-esr` (scripts/bootstrap.sh does as root) "
        "or set FUSION_FIREFOX to a Firefox executable",
    ),
]
WAIT_S = 30.0  # a bound on each wait for the page to reach a state
START_S = 60.0  # a bound on Firefox's start (its first start in a profile is the slowest)
STOP_S = 15.0  # a bound on Firefox's exit before it is killed

# The profile's prefs: Marionette on a port Firefox chooses, and none of Firefox's own
# network chatter or first-run pages (the machine may have no way out; a test must not
# wait on one). Marionette adds its recommended prefs for automation on top.
USER_JS = """
user_pref("marionette.port", 0);
user_pref("app.update.disabledForTesting", true);
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("browser.startup.homepage_override.mstone", "ignore");
user_pref("browser.startup.page", 0);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("network.captive-portal-service.enabled", false);
user_pref("network.connectivity-service.enabled", false);
user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);
"""


def _wait_for_port(profile: Path, firefox: subprocess.Popen[bytes]) -> int:
    """Marionette's port, once Firefox has written it to the profile."""
    active = profile / "MarionetteActivePort"
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if firefox.poll() is not None:
            raise RuntimeError(f"Firefox exited ({firefox.returncode}) before Marionette started")
        text = active.read_text().strip() if active.exists() else ""
        if text.isdigit():
            return int(text)
        time.sleep(0.05)  # polling for a file Firefox writes, bounded by the deadline
    raise TimeoutError(f"Marionette did not start within {START_S}s")


def _stop(firefox: subprocess.Popen[bytes]) -> None:
    """End Firefox and its content processes (its process group): politely, then not."""
    if firefox.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(firefox.pid, sig)
            except ProcessLookupError:
                break
            try:
                firefox.wait(timeout=STOP_S)
                break
            except subprocess.TimeoutExpired:
                continue
    with contextlib.suppress(ProcessLookupError):  # content processes that outlived it
        os.killpg(firefox.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def firefox() -> Iterator[Any]:
    """A Marionette session in a headless Firefox with a temporary profile. Whatever
    fails, from Firefox's start on, the finally ends Firefox and removes the profile."""
    assert FIREFOX is not None
    profile = Path(tempfile.mkdtemp(prefix="fusion-firefox-"))
    process: subprocess.Popen[bytes] | None = None
    client: Any = None
    try:
        (profile / "user.js").write_text(USER_JS)
        process = subprocess.Popen(
            [FIREFOX, "--headless", "--marionette", "--no-remote", "--profile", str(profile)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, MOZ_CRASHREPORTER_DISABLE="1"),
            start_new_session=True,  # its own process group, so the cleanup ends all of it
        )
        port = _wait_for_port(profile, process)
        # socket_timeout bounds every command: none can hang the test run.
        client = marionette.Marionette(port=port, socket_timeout=WAIT_S * 2)
        client.start_session(timeout=START_S)
        client.timeout.page_load = WAIT_S
        client.timeout.script = WAIT_S
        client.set_window_rect(width=1280, height=900)
        yield client
    finally:
        if client is not None and client.session is not None:
            with contextlib.suppress(OSError, errors.MarionetteException):
                client.delete_session()  # Firefox is going away regardless
        if process is not None:
            _stop(process)
        shutil.rmtree(profile, ignore_errors=True)


class Page:
    """The page in Firefox, addressed relative to the server, with bounded waits."""

    def __init__(self, client: Any, base_url: str) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")

    def goto(self, path: str) -> None:
        self.client.navigate(self.base_url + path)

    def wait(self, condition: Callable[[], Any], what: str) -> Any:
        return Wait(self.client, timeout=WAIT_S, interval=0.05).until(
            lambda _: condition(), message=f"waiting for {what}"
        )

    def all(self, css: str) -> list[Any]:
        return list(self.client.find_elements(By.CSS_SELECTOR, css))

    def one(self, css: str) -> Any:
        return self.wait(lambda: (self.all(css) or [None])[0], css)

    def text(self, css: str) -> str:
        """An element's text as the DOM holds it (textContent, shown or not)."""
        return str(self.client.execute_script("return arguments[0].textContent", [self.one(css)]))

    def wait_text(self, css: str, part: str) -> None:
        self.wait(lambda: part in self.text(css), f"{css} to contain {part!r}")

    def scripts(self) -> int:
        return int(self.client.execute_script("return document.scripts.length"))

    def no_dialog(self) -> None:
        """A dialog (an alert from a run's content, say) would be open now."""
        try:
            alert = self.client.switch_to_alert()
            text = alert.text
        except errors.NoAlertPresentException:
            return
        alert.dismiss()  # so that the next test's page is not blocked by it
        raise AssertionError(f"a dialog opened: {text!r}")


@pytest.fixture
def page(firefox: Any, server: httpx.Client) -> Iterator[Page]:
    page = Page(firefox, str(server.base_url))
    yield page
    page.no_dialog()
    firefox.delete_all_cookies()
    firefox.navigate("about:blank")  # the next test starts from nothing


def start_from_form(
    page: Page, workflow: str, fields: dict[str, str], models: dict[str, str]
) -> str:
    page.goto(f"/ui/workflows/{workflow}")
    for name, value in fields.items():
        field = page.one(f'[name="input.{name}"]')
        field.clear()
        field.send_keys(value)
    for role, model in models.items():
        page.one(f'select[name="model.{role}"] option[value="{model}"]').click()
    page.one("#start").click()
    page.wait(lambda: re.search(r"/ui/runs/wf-", page.client.get_url()), "the run's page")
    return str(page.client.get_url()).rsplit("/", 1)[1]


def test_a_run_started_from_the_form_turns_green_live(page: Page) -> None:
    start_from_form(
        page, "gated", {"text": "firefox says hi", "gate": "firefox-green"}, {"generation": "echo"}
    )
    # The page was rendered while `hold` waits: what follows comes over the event stream.
    page.one(node("say", "completed"))
    page.one(node("hold", "running"))
    assert page.text("#run-status") == "running"
    assert page.text("#live") == "live"  # following the event stream, not polling
    # say's tokens: only the event stream carries them (they are not stored with the run).
    page.wait_text('li.step[data-step="say"] pre.tokens', "firefox says hi")
    GATES.open("firefox-green")
    page.one(node("hold", "completed"))
    page.one(node("done", "completed"))
    page.one("#run-status.status-completed")
    page.one('li.step.status-completed[data-step="done"]')
    page.one('svg.timeline g.bar.status-completed[data-step="hold"]')
    page.wait_text("#run-result", '"said": "firefox says hi"')


def test_a_long_run_is_cancelled_from_its_page(page: Page) -> None:
    start_from_form(
        page, "gated", {"text": "never done", "gate": "firefox-never"}, {"generation": "echo"}
    )
    page.one(node("hold", "running"))
    page.one("#cancel").click()
    page.one("#run-status.status-cancelled")
    page.one(node("hold", "cancelled"))
    page.wait(lambda: not page.one("#cancel").is_displayed(), "the cancel button to hide")
    page.client.refresh()  # as stored
    page.one(node("hold", "cancelled"))
    assert page.all("#cancel") == []


def test_a_failed_steps_error_opens_on_click(page: Page) -> None:
    start_from_form(page, "fragile", {"data": "{}"}, {})
    page.one("#run-status.status-failed")
    page.one(node("risky", "failed"))
    error = 'li.step[data-step="risky"] > details.error'
    assert not page.one(f"{error} pre").is_displayed()  # closed until clicked
    page.one(f"{error} > summary").click()
    page.wait(lambda: page.one(f"{error} pre").is_displayed(), "the error to open")
    assert "value" in page.one(f"{error} pre").text


def test_script_in_an_output_is_shown_as_text(page: Page) -> None:
    start_from_form(page, "greet", {"text": SCRIPT}, {"generation": "echo"})
    page.one("#run-status.status-completed")
    page.wait_text("#run-result", SCRIPT)
    # Only the page's own script: the output's became text (the fixture fails on a dialog).
    assert page.scripts() == 1
    page.no_dialog()
    page.client.refresh()
    page.wait_text("#run-result", SCRIPT)
    assert page.scripts() == 1


def test_the_workflows_pages(page: Page) -> None:
    page.goto("/ui/workflows")
    page.one('a[href="/ui/workflows/gated"]').click()
    page.one('svg.dag g.node[data-step="hold"]')
    assert len(page.all("svg.dag path.edge")) == 2
    assert len(page.all("form.start textarea#in-text")) == 1


def test_with_a_key_the_login_cookie_serves_pages_stream_and_cancel(
    firefox: Any, tmp_path: Path
) -> None:
    with serving(tmp_path, api_keys={"ui": KEY}) as keyed:
        page = Page(firefox, str(keyed.base_url))
        try:
            page.goto("/ui/workflows/gated")
            page.wait(lambda: "/ui/login?next=" in page.client.get_url(), "the login page")
            page.one('[name="key"]').send_keys(KEY)
            page.one('form[action="/ui/login"] button').click()
            page.wait(lambda: page.client.get_url().endswith("/ui/workflows/gated"), "the way back")
            start_from_form(
                page, "gated", {"text": "keyed", "gate": "firefox-keyed"}, {"generation": "echo"}
            )
            # The event stream and the cancel call reach the API with the cookie.
            page.one(node("hold", "running"))
            page.wait_text('li.step[data-step="say"] pre.tokens', "keyed")
            page.one("#cancel").click()
            page.one("#run-status.status-cancelled")
            page.no_dialog()
        finally:
            firefox.delete_all_cookies()
            firefox.navigate("about:blank")
