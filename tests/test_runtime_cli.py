"""`fusion run` as a user runs it: the installed console script in a subprocess, printing
the result as JSON, with exit code 0 (completed), 1 (failed), 3 (partial) or 2 (refused)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from cli_helpers import run_main

from engine.cli import main

WORKFLOW = """
id: cli_demo
input_schema:
  type: object
  properties:
    query: {type: string}
    n: {type: integer}
    tags: {type: array, items: {type: string}}
    mode: {type: string, default: plain}
  required: [query, n]
steps:
  - step_id: echo
    type: template
    value: "{{ input.query }} x{{ input.n * 2 }}"
  - step_id: tags
    type: template
    value: "{{ input.tags + [input.mode] }}"
  - step_id: risky
    type: template
    when: "{{ input.query == 'partial' or input.query == 'fail' }}"
    value: "{{ input.missing_key }}"
    on_error: ON_ERROR
output:
  echo: "{{ steps.echo.output }}"
  tags: "{{ steps.tags.output }}"
  risky: "{{ steps.risky.status }}"
"""

CASES = {
    "ok": ["--input", "query=hello", "--input", "n=3", "--input-json", '{"tags": ["a"]}'],
    "partial": ["--input-json", '{"query": "partial", "n": 1, "tags": []}'],
    "fail": ["--input-json", '{"query": "fail", "n": 1, "tags": []}'],
}


def _fusion() -> list[str]:
    script = shutil.which("fusion", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "engine.cli"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Every case at once (each is a fresh interpreter): the module takes one start-up."""
    workdir = tmp_path_factory.mktemp("cli")
    files = {}
    for on_error in ("continue", "fail"):
        files[on_error] = workdir / f"demo_{on_error}.yaml"
        files[on_error].write_text(WORKFLOW.replace("ON_ERROR", on_error), encoding="utf-8")
    procs = {
        name: subprocess.Popen(
            [*_fusion(), "run", str(files["fail" if name == "fail" else "continue"]), *args],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in CASES.items()
    }
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def test_a_completed_run_prints_the_result_and_exits_0(runs) -> None:
    proc = runs["ok"]
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "completed"
    # The API's §3.1 names: workflow_id is the run, workflow the workflow it ran.
    assert result["workflow_id"].startswith("wf-")
    assert result["workflow"] == "cli_demo"
    assert result["workflow_source"] == "file"
    assert result["stored"] is False
    # --input values are JSON when they parse (n is the number 3), --input-json merges in
    assert result["result"] == {"echo": "hello x6", "tags": ["a", "plain"], "risky": "skipped"}
    assert [e["step"] for e in result["execution_trace"]] == ["echo", "tags", "risky"]
    assert {e["status"] for e in result["execution_trace"]} == {"completed", "skipped"}


def test_a_partial_run_exits_3(runs) -> None:
    proc = runs["partial"]
    assert proc.returncode == 3, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "partial"
    assert result["result"]["risky"] == "failed"
    risky = next(e for e in result["execution_trace"] if e["step"] == "risky")
    assert "missing_key" in risky["error"]


def test_a_failed_run_exits_1(runs) -> None:
    proc = runs["fail"]
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "failed"
    assert result["result"] is None
    assert result["error"].startswith("step 'risky' failed:")


# Refusals are checked in-process through the same entry point (`main` is what the console
# script calls): a fresh interpreter per case would only add start-up time.


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`fusion run` configures the process's logging; put back what other tests expect."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


def _workflow_file(tmp_path: Path) -> Path:
    path = tmp_path / "demo.yaml"
    path.write_text(WORKFLOW.replace("ON_ERROR", "fail"), encoding="utf-8")
    return path


def test_invalid_input_is_refused_with_exit_2_naming_the_pointer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _workflow_file(tmp_path)
    code, out, err = run_main(
        capsys, "run", str(path), "--input", "query=hello", "--input", "n=three"
    )
    assert code == 2
    assert out == ""
    assert err.startswith("error: input/n:")


def test_a_malformed_input_pair_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(capsys, "run", str(_workflow_file(tmp_path)), "--input", "query")
    assert code == 2
    assert out == ""
    assert "--input expects key=value" in err


def test_input_json_that_is_not_json_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["run", str(_workflow_file(tmp_path)), "--input-json", "{query"])
    assert code == 2
    assert "invalid JSON" in capsys.readouterr().err


# -- mocks, input files and --interactive -----------------------------------------------

MODEL_WORKFLOW = """
id: drafting
models:
  generation: {type: lm}
input_schema:
  type: object
  properties:
    topic: {type: string, description: what to write about}
    words: {type: integer, minimum: 1, default: 3}
    formal: {type: boolean}
  required: [topic]
steps:
  - step_id: draft
    type: model_call
    model_id: "{{ models.generation }}"
    operation: chat
    input: {prompt: "{{ input.topic }}"}
  - step_id: size
    type: template
    value: "{{ steps.draft.output.content | length }}"
output:
  text: "{{ steps.draft.output.content }}"
  size: "{{ steps.size.output }}"
  input: "{{ input }}"
"""


def _model_workflow(tmp_path: Path) -> Path:
    path = tmp_path / "drafting.yaml"
    path.write_text(MODEL_WORKFLOW, encoding="utf-8")
    # No start-up models: a run that needed one would fail, not load the demo setup.
    (tmp_path / "fusion.yaml").write_text("startup_models: []\n", encoding="utf-8")
    return path


def test_mocking_every_model_step_runs_without_loading_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _model_workflow(tmp_path)
    (tmp_path / "draft.yaml").write_text("content: four\nfinish_reason: stop\n")
    code, out, err = run_main(
        capsys, "run", str(path), "--input", "topic=x", "--mock", "draft=@draft.yaml"
    )
    assert code == 0, err
    assert "loading" not in err  # nothing loaded; the steps' progress only
    assert "> draft (model_call)\n< draft completed in " in err
    body = json.loads(out)
    assert body["result"] == {"text": "four", "size": 4, "input": {"topic": "x", "words": 3}}
    assert body["models"] == {"generation": None}
    draft = body["execution_trace"][0]
    assert (draft["step"], draft["mocked"], draft["model"]) == ("draft", True, None)
    assert "mocked" not in body["execution_trace"][1]


def test_a_mock_is_json_inline_or_from_a_json_file_else_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _model_workflow(tmp_path)
    (tmp_path / "draft.json").write_text('{"content": "from a file"}')
    runs = {
        "file": ["--mock", "draft=@draft.json"],
        "json": ["--mock", 'draft={"content": "inline"}', "--mock", "size=99"],
        "text": ["--mock", 'draft={"content": "ab"}', "--mock", "size=not json"],
    }
    results = {}
    for name, args in runs.items():
        assert main(["run", str(path), "--input", "topic=x", *args]) == 0
        results[name] = json.loads(capsys.readouterr().out)["result"]
    assert results["file"]["text"] == "from a file"
    assert (results["json"]["text"], results["json"]["size"]) == ("inline", 99)
    assert results["text"]["size"] == "not json"


def test_a_mock_of_no_step_is_refused_with_a_hint_before_anything_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _model_workflow(tmp_path)
    code, out, err = run_main(capsys, "run", str(path), "--input", "topic=x", "--mock", "drafts=1")
    assert code == 2
    assert out == ""
    assert (
        err == "error: workflow 'drafting' has no step 'drafts' to mock (did you mean 'draft'?)\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mock", "draft"], "--mock expects STEP=VALUE or STEP=@FILE"),
        (["--mock", "draft=@nothere.json"], "--mock: cannot read nothere.json"),
        (["--mock", "size=1", "--server", "http://127.0.0.1:9"], "--mock runs in-process only"),
        (["--input-json", "@in.json"], "--input-json: in.json:1:11: invalid JSON"),
        (["--config-json", "@in.yaml"], "--config-json: in.yaml:1:"),
        # The model step is not mocked, and no start-up model is configured.
        ([], "no 'lm' model to run 'drafting': pass --model generation=DIR"),
        (["--model", "generaton=echo"], "no model role 'generaton' (did you mean 'generation'?)"),
        (["--model", "generation=nosuch"], "not a model directory, 'echo', or a start-up model"),
    ],
)
def test_bad_run_arguments_are_usage_errors(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _model_workflow(tmp_path)
    (tmp_path / "in.json").write_text('{"topic": }')
    (tmp_path / "in.yaml").write_text("{a: [1, }\n")
    code, out, err = run_main(capsys, "run", str(path), "--input", "topic=x", *args)
    assert code == 2
    assert out == ""
    assert message in err


def _run_cli(args: list[str], cwd: Path, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_fusion(), "run", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_input_json_reads_a_file_or_stdin_and_input_pairs_override_it(tmp_path: Path) -> None:
    path = _model_workflow(tmp_path)
    (tmp_path / "in.yaml").write_text("topic: from yaml\nwords: 5\n")
    mock = ["--mock", 'draft={"content": ""}', "--mock", "size=0"]
    from_file = _run_cli([str(path), "--input-json", "@in.yaml", *mock], tmp_path, "")
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout)["result"]["input"] == {"topic": "from yaml", "words": 5}
    piped = _run_cli(
        [str(path), "--input-json", "@-", "--input", "words=2", *mock],
        tmp_path,
        '{"topic": "piped", "words": 9}',
    )
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["result"]["input"] == {"topic": "piped", "words": 2}


def test_interactive_asks_each_field_not_given_typed_with_retries(tmp_path: Path) -> None:
    path = _model_workflow(tmp_path)
    # words: "0" breaks its minimum and "many" is no integer, then 7; formal: "yes".
    answers = "0\nmany\n7\nyes\n"
    proc = _run_cli(
        [str(path), "--interactive", "--input", "topic=given", "--mock", 'draft={"content": ""}'],
        tmp_path,
        answers,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["result"]["input"] == {
        "topic": "given",
        "words": 7,
        "formal": True,
    }
    assert "topic" not in proc.stderr  # given on the command line: not asked
    assert "words (integer) [default: 3]" in proc.stderr
    assert "0 is less than the minimum of 1; try again" in proc.stderr
    assert "expected integer (JSON); try again" in proc.stderr
    assert "formal (boolean)" in proc.stderr


def test_interactive_empty_answers_take_defaults_and_a_required_field_must_be_answered(
    tmp_path: Path,
) -> None:
    path = _model_workflow(tmp_path)
    mock = ["--mock", 'draft={"content": ""}']
    proc = _run_cli([str(path), "--interactive", *mock], tmp_path, "\nhello world\n\n\n")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["result"]["input"] == {"topic": "hello world", "words": 3}
    assert "topic (string, required): what to write about" in proc.stderr
    assert "a value is required; try again" in proc.stderr
    refused = _run_cli([str(path), "--interactive", *mock], tmp_path, "\n\n\n")
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert "no valid value for 'topic' after 3 attempts (a value is required)" in refused.stderr
    ended = _run_cli([str(path), "--interactive", *mock], tmp_path, "")
    assert ended.returncode == 2
    assert "input ended before a value for required 'topic'" in ended.stderr


def test_a_run_that_calls_no_model_binds_model_names_as_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "roles.yaml"
    path.write_text(
        "models: {generation: {type: lm}}\n"
        "steps:\n  - {step_id: a, type: template, value: 'by {{ models.generation }}'}\n"
    )
    assert main(["run", str(path), "--model", "generation=qwen-0.5b"]) == 0
    out, err = capsys.readouterr()
    assert "loading" not in err  # nothing loaded
    body = json.loads(out)
    assert body["result"] == {"a": "by qwen-0.5b"}
    assert body["models"] == {"generation": "qwen-0.5b"}
