"""The CLI against a running server: `fusion models ls | ps | load | unload | info` and
`fusion run --server`, on a real server with the echo model loaded. Errors the server
answers (its §7 envelope) and an address where no server listens are one line on stderr
and exit 2."""

from __future__ import annotations

import argparse
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_helpers import running_server
from cli_helpers import fusion, run_main

from engine.cli.models import Elapsed
from engine.cli.remote import run_remote

GREETING = """\
id: greeting
name: Greeting
models:
  generation: {type: lm}
input_schema:
  type: object
  properties:
    name: {type: string}
  required: [name]
steps:
  - step_id: answer
    type: model_call
    model_id: "{{ models.generation }}"
    operation: chat
    input:
      prompt: "Hello {{ input.name }}, nice to meet you"
output:
  answer: "{{ steps.answer.output.content }}"
"""

# A model_call on a model that is not loaded: the step, and so the run, fails.
FAILING = """\
id: failing
name: Failing
steps:
  - step_id: lost
    type: model_call
    model_id: not-loaded
    operation: count_tokens
    input: some text
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(tmp_path_factory.mktemp("cli-models")) as client:
        loaded = client.post("/v1/models/load", json={"model_path": "echo", "model_type": "echo"})
        assert loaded.status_code == 200, loaded.text
        yield str(client.base_url)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


cli = run_main


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


# -- ls, ps, info -------------------------------------------------------------------------
def test_ls_is_an_aligned_table_of_the_loaded_models(
    server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "models", "ls", "--server", server)
    assert (code, err) == (0, "")
    header, *lines = out.splitlines()
    assert header.split() == ["ID", "TYPE", "FAMILY", "CONTEXT", "MEMORY", "STATUS", "TAGS"]
    assert [line.split() for line in lines] == [
        ["echo", "echo", "echo", "-", "0.00", "GB", "loaded", "local,chat"]
    ]
    assert lines[0].index("echo", 5) == header.index("TYPE")  # columns line up


def test_ls_json_is_the_model_list(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "models", "ls", "--format", "json", "--server", server)
    assert code == 0
    assert [(m["id"], m["type"]) for m in json.loads(out)] == [("echo", "echo")]


def test_ps_shows_each_models_queue(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "models", "ps", "--server", server)
    assert code == 0
    header, row = rows(out)
    assert header == ["ID", "ACTIVE", "QUEUED", "CONCURRENCY", "BATCH", "REQUESTS", "LAST", "USED"]
    assert row[:5] == ["echo", "0", "0", "1", "-"]
    code, out, _ = cli(capsys, "models", "ps", "--format", "json", "--server", server)
    [info] = json.loads(out)
    assert (info["model_id"], info["queue"]["active"], info["batch"]) == ("echo", 0, None)


def test_info_is_the_model_info_body_pretty_or_json(
    server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, "models", "info", "echo", "--server", server)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["model_id:", "echo"]
    assert "capabilities:     chat, embeddings" in lines
    assert "pinned:           false" in lines
    assert "  measured_bytes: 0" in lines  # nested objects indented under their key
    code, out, _ = cli(capsys, "models", "info", "echo", "--format", "json", "--server", server)
    body = json.loads(out)
    assert (body["model_id"], body["capabilities"]) == ("echo", ["chat", "embeddings"])


# -- load and unload ----------------------------------------------------------------------
def test_load_then_unload(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("models", "load", "anything", "--type", "echo", "--id", "cli-echo")
    code, out, err = cli(capsys, *argv, "--context-length", "64", "--server", server)
    assert code == 0, err
    assert err == "loading anything (echo)...\n"  # not a terminal: one plain line
    assert out.startswith("loaded cli-echo in ")
    assert out.endswith(" s, memory 0.00 GB\n")
    code, out, _ = cli(capsys, "models", "info", "cli-echo", "--format", "json", "--server", server)
    assert json.loads(out)["metadata"]["context_length"] == 64
    code, out, err = cli(capsys, "models", "unload", "cli-echo", "--server", server)
    assert (code, out, err) == (0, "unloaded cli-echo, freed 0.00 GB\n", "")


def test_load_json_is_the_load_body(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("models", "load", "x", "--type", "echo", "--id", "json-echo", "--format", "json")
    code, out, _ = cli(capsys, *argv, "--server", server)
    assert code == 0
    assert json.loads(out)["model_id"] == "json-echo"
    assert cli(capsys, "models", "unload", "json-echo", "--server", server)[0] == 0


def test_on_a_terminal_the_load_line_shows_a_spinner_and_the_seconds() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    assert Elapsed(stream, "loading m (lm)").run(lambda: 42) == 42
    text = stream.getvalue()
    assert text.startswith("\rloading m (lm) | ")
    assert text.endswith("s\r\x1b[K")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("models", "info", "nope"), "error: model 'nope' not found (model_not_found)\n"),
        (("models", "unload", "nope"), "error: model 'nope' not found (model_not_found)\n"),
        (
            ("models", "load", "x", "--type", "llm"),
            "error: model_type 'llm' is not one of lm, multimodal, embeddings, whisper, "
            "image-generation, image-edit, echo (invalid_model_type)\n",
        ),
    ],
)
def test_an_error_envelope_is_one_line_and_exit_2(
    server: str, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    code, out, err = cli(capsys, *argv, "--server", server)
    assert (code, out) == (2, "")
    assert err.endswith(message)


def test_no_server_is_one_line_and_exit_2(
    closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    assert cli(capsys, "models", "ls", "--server", url) == (
        2,
        "",
        f"error: no Fusion server at {url}\n",
    )


def test_the_server_comes_from_fusion_server_by_default(
    server: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FUSION_SERVER", server)
    assert cli(capsys, "models", "ls")[0] == 0


def test_the_api_key_is_sent_as_a_bearer_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_server(tmp_path, api_keys={"ci": "s3cret"}) as client:
        url = str(client.base_url)
        code, _, err = cli(capsys, "models", "ls", "--server", url)
        assert code == 2
        assert err.endswith("Bearer <key>' (authentication_failed)\n")  # after the server's log
        assert cli(capsys, "models", "ls", "--server", url, "--api-key", "s3cret")[0] == 0
        monkeypatch.setenv("FUSION_API_KEY", "s3cret")
        assert cli(capsys, "models", "ls", "--server", url)[0] == 0


def test_the_installed_command_lists_models(server: str, tmp_path: Path) -> None:
    done = fusion("models", "ls", "--server", server, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert rows(done.stdout)[1][:2] == ["echo", "echo"]


# -- fusion run --server ------------------------------------------------------------------
def run_args(workflow: str | Path, server: str, **given: Any) -> argparse.Namespace:
    """What `fusion run` parses (engine/cli/run.py) for a run on a server."""
    fields: dict[str, Any] = {
        "input": None,
        "input_json": None,
        "config_json": None,
        "model": None,
        "api_key": None,
    }
    return argparse.Namespace(workflow=str(workflow), server=server, **{**fields, **given})


def test_run_on_a_server_streams_steps_and_tokens_and_prints_the_body(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "greeting.yaml"
    path.write_text(GREETING)
    args = run_args(path, server, input=["name=Ada"], model=["generation=echo"])
    assert run_remote(args) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0] == "> answer (model_call)"
    assert lines[1] == "Hello Ada, nice to meet you"  # the tokens, as they came
    assert lines[2].startswith("< answer completed in ")
    assert lines[2].endswith(" ms")
    body = json.loads(captured.out)
    assert (body["status"], body["result"]) == (
        "completed",
        {"answer": "Hello Ada, nice to meet you"},
    )
    assert body["models"] == {"generation": "echo"}


def test_a_failed_run_exits_1(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "failing.yaml"
    path.write_text(FAILING)
    assert run_remote(run_args(path, server)) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["status"] == "failed"
    assert "< lost failed" in captured.err
    assert "model 'not-loaded' not found" in captured.err


def test_run_errors_before_the_stream_are_one_line_and_exit_2(
    server: str, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_remote(run_args("no_such_workflow", server)) == 2
    assert capsys.readouterr().err.endswith("(invalid_workflow)\n")
    url = f"http://127.0.0.1:{closed_port}"
    assert run_remote(run_args("greeting", url)) == 2
    assert capsys.readouterr().err == f"error: no Fusion server at {url}\n"


def test_fusion_run_with_server_as_a_user_runs_it(server: str, tmp_path: Path) -> None:
    path = tmp_path / "greeting.yaml"
    path.write_text(GREETING)
    argv = ("run", path, "--server", server, "--input", "name=Ada", "--model", "generation=echo")
    done = fusion(*argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[:2] == ["> answer (model_call)", "Hello Ada, nice to meet you"]
    assert json.loads(done.stdout)["result"] == {"answer": "Hello Ada, nice to meet you"}
    failing = tmp_path / "failing.yaml"
    failing.write_text(FAILING)
    done = fusion("run", failing, "--server", server, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["status"] == "failed"
