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
    assert result["workflow_id"] == "cli_demo"
    # --input values are JSON when they parse (n is the number 3), --input-json merges in
    assert result["output"] == {"echo": "hello x6", "tags": ["a", "plain"], "risky": "skipped"}
    assert [e["step_id"] for e in result["trace"]] == ["echo", "tags", "risky"]
    assert {e["status"] for e in result["trace"]} == {"completed", "skipped"}


def test_a_partial_run_exits_3(runs) -> None:
    proc = runs["partial"]
    assert proc.returncode == 3, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "partial"
    assert result["output"]["risky"] == "failed"
    risky = next(e for e in result["trace"] if e["step_id"] == "risky")
    assert "missing_key" in risky["error"]


def test_a_failed_run_exits_1(runs) -> None:
    proc = runs["fail"]
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "failed"
    assert result["output"] is None
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
    code = main(["run", str(path), "--input", "query=hello", "--input", "n=three"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.startswith("error: input/n:")


def test_a_malformed_input_pair_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["run", str(_workflow_file(tmp_path)), "--input", "query"])
    out, err = capsys.readouterr()
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
