"""`fusion validate`, `fusion graph` and `fusion schema` as a user runs them: a real
subprocess, real files, exit codes and the three output formats."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = Path(__file__).resolve().parent / "workflows"
VALID = WORKFLOWS / "valid"
INVALID = WORKFLOWS / "invalid"


def fusion(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A directory to validate: valid files at the top, invalid ones nested below."""
    for name in ("kitchen_sink.yaml", "child_echo.yaml", "fan_out_fan_in.json"):
        shutil.copy(VALID / name, tmp_path / name)
    nested = tmp_path / "team" / "drafts"
    nested.mkdir(parents=True)
    shutil.copy(INVALID / "cycle.yaml", nested / "cycle.yaml")
    shutil.copy(INVALID / "many_errors.yaml", tmp_path / "team" / "many_errors.yaml")
    (tmp_path / "team" / "notes.txt").write_text("not a workflow: ignored\n")
    return tmp_path


def test_valid_files_exit_0(tmp_path: Path) -> None:
    result = fusion("validate", VALID, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    assert "4 file(s) checked, 0 error(s)" in result.stderr


def test_one_error_exits_1(tmp_path: Path) -> None:
    result = fusion("validate", VALID / "conditional.yaml", INVALID / "cycle.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{INVALID / 'cycle.yaml'}:3:14: steps[0].step_id: dependency cycle: a -> b -> a "
        "(each step feeds the next); break it by removing one of these references"
    ]
    assert "2 file(s) checked, 1 error(s) in 1 file(s)" in result.stderr


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    result = fusion("validate", tmp_path / "nope.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert "nope.yaml: <root>: no such file or directory" in result.stdout


def test_workflow_ids_come_from_the_workflows_dir(tmp_path: Path) -> None:
    """kitchen_sink calls child_echo by id: known from --workflows-dir, unknown without."""
    alone = fusion("validate", VALID / "kitchen_sink.yaml", cwd=tmp_path)
    assert alone.returncode == 1
    assert "unknown workflow 'child_echo'" in alone.stdout
    with_dir = fusion(
        "validate", VALID / "kitchen_sink.yaml", "--workflows-dir", VALID, cwd=tmp_path
    )
    assert with_dir.returncode == 0, with_dir.stdout


TEXT_LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<key>\S+): (?P<msg>.+)$")


def test_directory_recurses_and_reports_all_errors_of_all_files(tree: Path) -> None:
    result = fusion("validate", ".", "--format", "text", cwd=tree)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    parsed = [TEXT_LINE.match(line) for line in lines]
    assert all(parsed), lines
    per_file: dict[str, int] = {}
    for match in parsed:
        assert match is not None
        per_file[match["file"]] = per_file.get(match["file"], 0) + 1
    assert per_file == {"team/drafts/cycle.yaml": 1, "team/many_errors.yaml": 15}
    first = parsed[0]
    assert first is not None
    assert (first["file"], first["line"], first["col"], first["key"]) == (
        "team/drafts/cycle.yaml",
        "3",
        "14",
        "steps[0].step_id",
    )
    assert "5 file(s) checked, 16 error(s) in 2 file(s)" in result.stderr


def test_json_format(tree: Path) -> None:
    result = fusion("validate", "team", "--format", "json", cwd=tree)
    assert result.returncode == 1
    issues = json.loads(result.stdout)
    assert len(issues) == 16
    assert all({"file", "line", "col", "path", "message"} <= set(i) for i in issues)
    cycle = issues[0]
    assert cycle["file"] == "team/drafts/cycle.yaml"
    assert (cycle["line"], cycle["col"], cycle["path"]) == (3, 14, "/steps/0/step_id")
    assert cycle["message"].startswith("dependency cycle: a -> b -> a")
    pointers = {i["path"] for i in issues if i["file"] == "team/many_errors.yaml"}
    assert {"/descripton", "/steps/3/depends_on/0", "/output/text"} <= pointers


def test_json_format_with_no_errors_is_an_empty_list(tmp_path: Path) -> None:
    result = fusion("validate", VALID, "--format", "json", cwd=tmp_path)
    assert result.returncode == 0
    assert json.loads(result.stdout) == []


def test_github_format(tmp_path: Path) -> None:
    shutil.copy(INVALID / "jinja_syntax_error.yaml", tmp_path / "a,b.yaml")
    result = fusion("validate", "a,b.yaml", "--format", "github", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    # Property values escape ',' (and ':'), messages escape '%': GitHub decodes them.
    assert lines[0] == (
        "::error file=a%2Cb.yaml,line=5,col=12::steps[0].value: template syntax error: "
        "expected token 'name', got 'end of print statement'"
    )
    assert lines[1].startswith("::error file=a%2Cb.yaml,line=8,col=12::steps[1].value: ")
    assert "got '%25'" in lines[1]
    assert all(re.match(r"^::error file=[^,:]+,line=\d+,col=\d+::\S", line) for line in lines)


def test_yaml_syntax_error_is_reported_with_position(tmp_path: Path) -> None:
    result = fusion("validate", INVALID / "yaml_unclosed_bracket.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{INVALID / 'yaml_unclosed_bracket.yaml'}:5:12: <root>: ")
    assert "YAML syntax error" in result.stdout


# -- fusion graph ---------------------------------------------------------------------------


def test_graph_prints_mermaid_with_dashed_conditional_edges(tmp_path: Path) -> None:
    result = fusion("graph", VALID / "conditional.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "flowchart TD"
    edges = {line.strip() for line in lines if "->" in line}
    assert edges == {
        "start --> maybe",  # unconditional: solid
        "maybe -. skip propagates .-> after",  # a skip of `maybe` skips `after`: dashed
        "maybe -. if ran .-> fallback",  # `fallback` reads maybe.ran itself: dashed
    }
    nodes = {line.strip().split("[")[0].split("{")[0] for line in lines[1:] if "->" not in line}
    assert nodes == {"start", "maybe", "after", "fallback"}
    assert any(line.strip().startswith('maybe{{"maybe') for line in lines)  # conditional shape


def test_graph_of_invalid_workflow_reports_issues(tmp_path: Path) -> None:
    result = fusion("graph", INVALID / "cycle.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert "dependency cycle: a -> b -> a" in result.stdout
    assert "flowchart" not in result.stdout


# -- fusion schema ----------------------------------------------------------------------------


def test_schema_output_file(tmp_path: Path) -> None:
    target = tmp_path / "out.schema.json"
    result = fusion("schema", "-o", target, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    written = json.loads(target.read_text(encoding="utf-8"))
    checked_in = json.loads((ROOT / "schemas" / "workflow.schema.json").read_text("utf-8"))
    assert written == checked_in


def test_steps_lists_every_step_type_with_its_output_schema(tmp_path: Path) -> None:
    result = fusion("steps", "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listing = {item["type"]: item for item in json.loads(result.stdout)}
    schema = json.loads((ROOT / "schemas" / "workflow.schema.json").read_text("utf-8"))
    for name, item in listing.items():
        step = schema["$defs"][f"step.{name}"]
        assert item["output_schema"] == step["x-output-schema"]
        assert set(item["params_schema"]["properties"]) < set(step["properties"])
    assert {"template", "workflow", "model_call", "chunk"} <= set(listing)
    text = fusion("steps", cwd=tmp_path).stdout
    assert "chunk: " in text
    assert "output: array<string>" in text  # chunk's declared output, as the checker types it
