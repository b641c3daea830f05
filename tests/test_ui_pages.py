"""The web UI's pages (server/ui) over HTTP, without a browser: a real server with the
echo model loaded and test workflows; what each page holds, that user content is escaped,
the key (header or the login form's cookie), the form posts' origin check (CSRF) and the
Content-Security-Policy. tests/test_ui_browser.py drives the same pages in Chromium."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import running_server, wait_for

ECHO = {"model_path": "echo", "model_type": "echo", "model_id": "echo"}
KEY = "ui-test-key&;=,x"  # characters a cookie cannot hold as they are
SCRIPT = "<script>alert('x')</script>"

# Greets through the echo model (a token stream), with one input of each kind the form
# draws.
GREET = """
id: greet
name: Greeting
description: Say hello through a model
models:
  generation: {type: lm}
input_schema:
  type: object
  properties:
    text: {type: string, minLength: 1, description: what to say}
    times: {type: integer, minimum: 1, default: 1}
    ratio: {type: number}
    loud: {type: boolean}
    mood: {type: string, enum: [calm, "<b>bold</b>"]}
    tags: {type: array, items: {type: string}}
  required: [text]
steps:
  - step_id: say
    type: model_call
    model_id: "{{ models.generation }}"
    operation: chat
    input:
      messages:
        - {role: user, content: "{{ input.text }}"}
      max_tokens: 64
  - step_id: shout
    type: template
    value: "{{ steps.say.output.content | upper if input.loud else steps.say.output.content }}"
output:
  said: "{{ steps.shout.output }}"
  times: "{{ input.times }}"
  tags: "{{ input.tags | default([]) }}"
"""

# `risky` fails when input.data has no `value`.
FRAGILE = """
id: fragile
name: Fragile
input_schema:
  type: object
  properties:
    data: {type: object}
steps:
  - step_id: ok
    type: template
    value: fine
  - step_id: risky
    type: template
    value: "{{ input.data.value }}"
"""


# A for_each step: each item is a child step of `each` in the trace.
EACH = """
id: each
name: Each
steps:
  - step_id: each
    type: template
    for_each: "{{ ['a', 'b', '<i>c</i>'] }}"
    value: "{{ item }}!"
"""


def write_workflows(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "greet.yaml").write_text(GREET)
    (directory / "fragile.yaml").write_text(FRAGILE)
    (directory / "each.yaml").write_text(EACH)


def server_settings(tmp: Path) -> dict[str, Any]:
    write_workflows(tmp / "wf")
    return {"startup_models": [ECHO]}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("ui")
    with running_server(tmp, **server_settings(tmp)) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("ui-keyed")
    with running_server(tmp, api_keys={"ui": KEY}, **server_settings(tmp)) as c:
        yield c


def origin(client: httpx.Client) -> dict[str, str]:
    return {"Origin": str(client.base_url).rstrip("/")}


def start(client: httpx.Client, workflow: str, form: dict[str, str]) -> str:
    """Post the start-a-run form as a browser does; the run's id from the redirect."""
    response = client.post(f"/ui/workflows/{workflow}/run", data=form, headers=origin(client))
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert location.startswith("/ui/runs/"), location
    return location.removeprefix("/ui/runs/")


def ended(client: httpx.Client, run_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {}

    def done() -> bool:
        nonlocal body
        response = client.get(f"/api/fusion/runs/{run_id}")
        body = response.json() if response.status_code == 200 else {}
        return body.get("status") not in (None, "running")

    wait_for(done, what=f"run {run_id} to end")
    return body


def test_the_workflows_page_lists_each_workflow(client: httpx.Client) -> None:
    page = client.get("/ui/workflows")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'href="/ui/workflows/greet"' in page.text
    assert 'href="/ui/workflows/fragile"' in page.text
    assert "Say hello through a model" in page.text


def test_a_workflow_page_draws_its_graph_and_a_form_from_its_input_schema(
    client: httpx.Client,
) -> None:
    page = client.get("/ui/workflows/greet").text
    # The DAG: a node per step, an edge from `say` to `shout`, `say` in the first column.
    assert re.search(r'<g class="node[^"]*" data-step="say" transform="translate\(8,8\)"', page)
    assert 'data-step="shout"' in page
    assert 'data-from="say" data-to="shout"' in page
    # One field per property, of its kind.
    assert '<textarea id="in-text" name="input.text" rows="3" required>' in page
    assert 'type="number" id="in-times" name="input.times" step="1" value="1"' in page
    assert 'name="input.ratio" step="any"' in page
    assert 'type="checkbox" id="in-loud" name="input.loud"' in page
    assert '<select id="in-mood" name="input.mood">' in page
    assert 'class="json"' in page  # tags: an array, as JSON
    # The enum value holding markup is an escaped option, not markup.
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "<b>bold</b>" not in page
    # A model select per role, listing the loaded echo model.
    assert '<select id="model-generation" name="model.generation">' in page
    assert '<option value="echo">echo (echo)</option>' in page
    # The input schema itself.
    assert "what to say" in page


def test_the_form_starts_a_run_and_its_page_shows_it(client: httpx.Client) -> None:
    run_id = start(
        client,
        "greet",
        {
            "input.text": "hello there",
            "input.times": "2",
            "input.loud": "true",
            "input.tags": '["a", "b"]',
            "model.generation": "echo",
        },
    )
    body = ended(client, run_id)
    assert body["status"] == "completed", body
    assert body["result"] == {"said": "HELLO THERE", "times": 2, "tags": ["a", "b"]}
    page = client.get(f"/ui/runs/{run_id}").text
    assert f'data-run-id="{run_id}" data-status="completed"' in page
    # The DAG's nodes and the steps' list carry each step's status.
    assert re.search(r'class="node status-completed" data-step="say"', page)
    assert re.search(r'<li class="step status-completed" data-step="shout"', page)
    # A timeline bar per step; the step's parameters as written; the result.
    assert re.search(r'<g class="bar status-completed" data-step="say" data-offset-ms=', page)
    assert "{{ models.generation }}" in page
    assert "HELLO THERE" in page
    # The listing shows it.
    listing = client.get("/ui/runs", params={"workflow": "greet"}).text
    assert f'href="/ui/runs/{run_id}"' in listing


def test_a_refused_input_shows_the_form_again_with_the_reason(client: httpx.Client) -> None:
    response = client.post(
        "/ui/workflows/greet/run",
        data={"input.text": "hi", "input.tags": "[not json", "model.generation": "echo"},
        headers=origin(client),
    )
    assert response.status_code == 400
    assert "tags: not valid JSON" in response.text
    assert "[not json" in response.text  # the value given, kept
    missing = client.post(
        "/ui/workflows/greet/run", data={"model.generation": "echo"}, headers=origin(client)
    )
    assert missing.status_code == 400
    assert 'role="alert"' in missing.text


def test_a_failed_step_shows_its_error(client: httpx.Client) -> None:
    run_id = start(client, "fragile", {"input.data": "{}"})
    assert ended(client, run_id)["status"] == "failed"
    page = client.get(f"/ui/runs/{run_id}").text
    step = page[page.index('data-step="risky" id="step-risky"') :]
    error = re.search(
        r'<details class="error">\s*<summary>Error</summary>\s*<pre[^>]*>(.*?)</pre>', step, re.S
    )
    assert error is not None
    assert "value" in error.group(1)
    assert re.search(r'class="node status-failed" data-step="risky"', page)


def test_child_steps_are_nested_under_their_step(client: httpx.Client) -> None:
    run_id = start(client, "each", {})
    body = ended(client, run_id)
    assert body["status"] == "completed", body
    children = body["execution_trace"][0]["children"]
    page = client.get(f"/ui/runs/{run_id}").text
    top = page.index('data-step="each" id="step-each"')
    for child in children:
        key = "/".join(str(p) for p in child["path"])
        at = page.index(f'<li class="step status-completed" data-step="{key}">')
        assert at > top
    assert "<i>" not in page


def test_user_content_is_escaped(client: httpx.Client) -> None:
    run_id = start(client, "greet", {"input.text": SCRIPT, "model.generation": "echo"})
    assert ended(client, run_id)["result"]["said"] == SCRIPT
    page = client.get(f"/ui/runs/{run_id}").text
    assert SCRIPT not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    assert "<script" not in page.replace('<script src="/ui/static/run.js" defer></script>', "")


def test_a_step_shows_its_rendered_input_and_output_escaped(client: httpx.Client) -> None:
    run_id = start(client, "greet", {"input.text": SCRIPT, "model.generation": "echo"})
    assert ended(client, run_id)["status"] == "completed"
    page = client.get(f"/ui/runs/{run_id}").text
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
    step = page[page.index('data-step="shout" id="step-shout"') :]
    shown = re.search(
        r'<details class="input"><summary>[^<]*</summary><pre>(.*?)</pre></details>\s*'
        r'<details class="output"><summary>[^<]*</summary><pre data-role="output">(.*?)</pre>',
        step,
        re.S,
    )
    assert shown is not None, step[:2000]
    # The rendered parameters as pretty JSON (the template's value, not "{{ ... }}"), the
    # output as text, both escaped; collapsed (no `open`).
    assert shown.group(1) == "{\n  &#34;value&#34;: &#34;" + escaped + "&#34;\n}"
    assert shown.group(2) == escaped
    say = page[
        page.index('data-step="say" id="step-say"') : page.index(
            'data-step="shout" id="step-shout"'
        )
    ]
    assert "&#34;max_tokens&#34;: 64" in say  # the model call's rendered input
    assert "{{" not in say.split('class="input"')[1]
    assert SCRIPT not in page


def test_pages_carry_a_content_security_policy_without_inline_script(
    client: httpx.Client,
) -> None:
    for path in ("/ui/runs", "/ui/workflows", "/ui/workflows/greet", "/ui/login"):
        response = client.get(path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "unsafe-inline" not in policy
        assert "frame-ancestors 'none'" in policy
        # No inline script or style: each <script> has a src, no style attribute.
        assert re.search(r"<script(?![^>]*\bsrc=)", response.text) is None, path
        assert " style=" not in response.text, path
    assert client.get("/ui/static/run.js").status_code == 200
    assert client.get("/ui/static/ui.css").headers["content-type"].startswith("text/css")


def test_unknown_run_and_workflow_are_404_pages(client: httpx.Client) -> None:
    for path in ("/ui/runs/wf-nope", "/ui/workflows/nope"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("text/html")
        assert "Not found" in response.text


def test_the_runs_page_filters_and_pages(client: httpx.Client) -> None:
    ids = [start(client, "fragile", {"input.data": '{"value": 1}'}) for _ in range(3)]
    for run_id in ids:
        assert ended(client, run_id)["status"] == "completed"
    first = client.get(
        "/ui/runs", params={"workflow": "fragile", "status": "completed", "limit": 2}
    )
    assert first.status_code == 200
    shown = re.findall(r'href="/ui/runs/(wf-[^"]+)"', first.text)
    assert len(shown) == 2
    assert 'rel="next"' in first.text
    next_url = re.search(r'href="([^"]+)" rel="next"', first.text)
    assert next_url is not None
    second = client.get(next_url.group(1).replace("&amp;", "&"))
    more = re.findall(r'href="/ui/runs/(wf-[^"]+)"', second.text)
    assert more
    assert not set(more) & set(shown)
    failed_only = client.get("/ui/runs", params={"workflow": "fragile", "status": "failed"}).text
    assert not set(re.findall(r'href="/ui/runs/(wf-[^"]+)"', failed_only)) & set(ids)


def test_form_posts_from_another_origin_are_refused(client: httpx.Client) -> None:
    form = {"input.text": "hi", "model.generation": "echo"}
    foreign = client.post(
        "/ui/workflows/greet/run", data=form, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    unnamed = client.post("/ui/workflows/greet/run", data=form)  # neither Origin nor Referer
    assert unnamed.status_code == 403
    assert "Origin" in unnamed.text


def test_with_a_key_set_pages_need_it(keyed: httpx.Client) -> None:
    page = keyed.get("/ui/runs?status=completed")
    assert page.status_code == 303
    assert page.headers["location"] == "/ui/login?next=%2Fui%2Fruns%3Fstatus%3Dcompleted"
    assert keyed.get("/ui/login").status_code == 200  # the login page and static files are open
    assert keyed.get("/ui/static/ui.css").status_code == 200
    # Logging out only clears the cookie: no key needed.
    assert keyed.post("/ui/logout", headers=origin(keyed)).status_code == 303
    # The header works as for the API.
    assert keyed.get("/ui/runs", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_login_form_sets_a_strict_http_only_cookie(keyed: httpx.Client) -> None:
    wrong = keyed.post(
        "/ui/login", data={"key": "nope", "next": "/ui/workflows"}, headers=origin(keyed)
    )
    assert wrong.status_code == 401
    assert "not valid" in wrong.text
    login = keyed.post(
        "/ui/login", data={"key": KEY, "next": "/ui/workflows"}, headers=origin(keyed)
    )
    assert login.status_code == 303
    assert login.headers["location"] == "/ui/workflows"
    cookie = login.headers["set-cookie"]
    assert cookie.startswith("fusion_key=")
    assert "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    value = cookie.split(";")[0].split("=", 1)[1]
    with httpx.Client(base_url=keyed.base_url, cookies={"fusion_key": value}) as browser:
        assert browser.get("/ui/workflows").status_code == 200
        # The same cookie reaches the API, as the run page's script calls it.
        assert browser.get("/api/fusion/workflows").status_code == 200
        logout = browser.post("/ui/logout", headers=origin(browser))
        assert logout.status_code == 303
        assert "Max-Age=0" in logout.headers["set-cookie"]
    with httpx.Client(base_url=keyed.base_url, cookies={"fusion_key": "wrong"}) as stranger:
        assert stranger.get("/api/fusion/workflows").status_code == 401


def test_login_goes_back_only_to_ui_pages(keyed: httpx.Client) -> None:
    for target in ("https://evil.example/", "//evil.example/ui", "/api/fusion/runs"):
        login = keyed.post("/ui/login", data={"key": KEY, "next": target}, headers=origin(keyed))
        assert login.headers["location"] == "/ui/runs", target
