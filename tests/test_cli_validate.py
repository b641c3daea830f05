"""`fusion validate`, `fusion graph` and `fusion schema` as a user runs them: a real
subprocess, real files, exit codes and the three output formats."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from cli_helpers import fusion

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = Path(__file__).resolve().parent / "workflows"
VALID = WORKFLOWS / "valid"
INVALID = WORKFLOWS / "invalid"


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


# kitchen_sink's config key `top_k` is read by no template: lint's one finding in valid/.
KITCHEN_SINK_INFO = "config key 'top_k' is not read by any template [info: unused-config]"


def test_valid_files_exit_0(tmp_path: Path) -> None:
    result = fusion("validate", VALID, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        result.stdout == f"{VALID / 'kitchen_sink.yaml'}:22:3: config.top_k: {KITCHEN_SINK_INFO}\n"
    )
    assert "4 file(s) checked, 0 error(s) in 0 file(s), 0 warning(s), 1 info(s)" in result.stderr


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
    lines = [line for line in result.stdout.splitlines() if not line.endswith(KITCHEN_SINK_INFO)]
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
    report = json.loads(result.stdout)
    assert report["summary"] == {"files": 2, "errors": 16, "warnings": 0, "infos": 0}
    issues = report["findings"]
    assert len(issues) == 16
    assert {(i["rule"], i["severity"]) for i in issues} == {("compile", "error")}
    assert all({"file", "line", "col", "path", "message"} <= set(i) for i in issues)
    cycle = issues[0]
    assert cycle["file"] == "team/drafts/cycle.yaml"
    assert (cycle["line"], cycle["col"], cycle["path"]) == (3, 14, "/steps/0/step_id")
    assert cycle["message"].startswith("dependency cycle: a -> b -> a")
    pointers = {i["path"] for i in issues if i["file"] == "team/many_errors.yaml"}
    assert {"/descripton", "/steps/3/depends_on/0", "/output/text"} <= pointers


def test_json_format_with_no_errors(tmp_path: Path) -> None:
    result = fusion("validate", VALID, "--format", "json", cwd=tmp_path)
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert report["summary"] == {"files": 4, "errors": 0, "warnings": 0, "infos": 1}
    assert [(f["rule"], f["severity"], f["path"]) for f in report["findings"]] == [
        ("unused-config", "info", "/config/top_k")
    ]


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


# -- lint: severities, --strict, formats, --exclude, which files a directory holds -----------
LINTED = """\
id: linted
input_schema:
  type: object
  properties:
    mode: {type: string}
config:
  unused: 1
steps:
  - step_id: slow
    type: template
    when: "{{ input.mode }} == 'slow'"
    value: x
output: "{{ steps.slow.output | default('', true) }}"
"""
UNDECLARED = """\
id: undeclared
input_schema:
  type: object
  properties:
    text: {type: string}
steps:
  - step_id: a
    type: template
    value: "{{ input.body }}"
"""


@pytest.fixture
def linted(tmp_path: Path) -> Path:
    (tmp_path / "linted.yaml").write_text(LINTED)
    return tmp_path


def test_warnings_and_infos_do_not_fail_unless_strict(linted: Path) -> None:
    result = fusion("validate", "linted.yaml", cwd=linted)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "linted.yaml:7:3: config.unused: config key 'unused' is not read by any template "
        "[info: unused-config]",
        "linted.yaml:11:11: steps[0].when: 'when' is text around a template "
        "(\"{{ input.mode }} == 'slow'\"): it renders to a non-empty string, which is always "
        "true; put the whole condition inside one {{ expression }}, e.g. "
        "\"{{ input.mode == 'slow' }}\" [warning: when-constant]",
    ]
    assert "1 file(s) checked, 0 error(s) in 0 file(s), 1 warning(s), 1 info(s)" in (result.stderr)
    assert fusion("validate", "linted.yaml", "--strict", cwd=linted).returncode == 1


def test_infos_do_not_fail_even_when_strict(tmp_path: Path) -> None:
    (tmp_path / "info.yaml").write_text(LINTED.replace("\"{{ input.mode }} == 'slow'\"", "true"))
    result = fusion("validate", "info.yaml", "--strict", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("\n") == 1
    assert "[info: unused-config]" in result.stdout


def test_error_severity_lint_fails(tmp_path: Path) -> None:
    (tmp_path / "undeclared.yaml").write_text(UNDECLARED)
    result = fusion("validate", "undeclared.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == (
        "undeclared.yaml:9:12: steps[0].value: input_schema does not declare input field "
        "'body'; declared: text [error: undeclared-input]\n"
    )
    assert "0 warning(s)" in result.stderr
    assert "1 error(s) in 1 file(s)" in result.stderr


def test_json_format_has_severities_and_a_summary(linted: Path) -> None:
    (linted / "undeclared.yaml").write_text(UNDECLARED)
    result = fusion("validate", ".", "--format", "json", cwd=linted)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["summary"] == {"files": 2, "errors": 1, "warnings": 1, "infos": 1}
    assert [
        (f["file"], f["rule"], f["severity"], f["line"], f["col"]) for f in report["findings"]
    ] == [
        ("linted.yaml", "unused-config", "info", 7, 3),
        ("linted.yaml", "when-constant", "warning", 11, 11),
        ("undeclared.yaml", "undeclared-input", "error", 9, 12),
    ]


def test_github_format_uses_each_severitys_command(linted: Path) -> None:
    result = fusion("validate", "linted.yaml", "--format", "github", cwd=linted)
    assert result.returncode == 0
    notice, warning = result.stdout.splitlines()
    assert notice == (
        "::notice file=linted.yaml,line=7,col=3::config.unused: config key 'unused' is not "
        "read by any template [unused-config]"
    )
    assert warning.startswith("::warning file=linted.yaml,line=11,col=11::steps[0].when: ")
    assert warning.endswith(" [when-constant]")


def test_sarif_format(linted: Path) -> None:
    shutil.copy(INVALID / "cycle.yaml", linted / "cycle.yaml")
    result = fusion("validate", ".", "--format", "sarif", cwd=linted)
    assert result.returncode == 1
    sarif = json.loads(result.stdout)
    assert sarif["version"] == "2.1.0"
    assert sarif["$schema"].endswith("sarif-2.1.0.json")
    (run,) = sarif["runs"]
    rules = run["tool"]["driver"]["rules"]
    ids = [rule["id"] for rule in rules]
    assert ids[0] == "compile"
    assert {"when-constant", "skipped-read", "undeclared-input", "unused-config"} <= set(ids)
    assert all(rule["shortDescription"]["text"] for rule in rules)
    levels = {rule["id"]: rule["defaultConfiguration"]["level"] for rule in rules}
    assert levels["unused-config"] == "note"
    assert levels["undeclared-input"] == "error"
    results = [
        (
            r["ruleId"],
            r["level"],
            ids[r["ruleIndex"]],
            r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
            r["locations"][0]["physicalLocation"]["region"],
        )
        for r in run["results"]
    ]
    assert results == [
        ("compile", "error", "compile", "cycle.yaml", {"startLine": 3, "startColumn": 14}),
        (
            "unused-config",
            "note",
            "unused-config",
            "linted.yaml",
            {"startLine": 7, "startColumn": 3},
        ),
        (
            "when-constant",
            "warning",
            "when-constant",
            "linted.yaml",
            {"startLine": 11, "startColumn": 11},
        ),
    ]


def test_exclude_globs(tree: Path) -> None:
    result = fusion(
        "validate", ".", "--exclude", "drafts/*", "--exclude", "*many_errors*", cwd=tree
    )
    assert result.returncode == 0, result.stdout
    assert "3 file(s) checked, 0 error(s)" in result.stderr
    named = fusion("validate", "team/many_errors.yaml", "--exclude", "team/*", cwd=tree)
    assert named.returncode == 1  # excluding everything leaves nothing checked
    assert "0 file(s) checked" in named.stderr


def test_directory_checks_only_files_that_look_like_workflows(tmp_path: Path) -> None:
    shutil.copy(VALID / "conditional.yaml", tmp_path / "conditional.yaml")
    actions = (
        "name: ci\non: [push]\njobs:\n  test:\n    runs-on: ubuntu-latest\n"
        "    steps:\n      - uses: actions/checkout@v4\n"
    )
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "ci.yml").write_text(actions)
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "pipeline.yml").write_text(actions)  # not hidden: judged by content
    (tmp_path / "docker-compose.yml").write_text("services:\n  web:\n    image: nginx\n")
    (tmp_path / "chart" / "templates").mkdir(parents=True)
    (tmp_path / "chart" / "templates" / "deploy.yaml").write_text(
        "image: {{ .Values.image }}\n"  # Helm: not even YAML
    )
    (tmp_path / "package.json").write_text('{"name": "x", "scripts": {}}\n')
    (tmp_path / "broken.yaml").write_text("steps:\n  - step_id: [a\n")  # a workflow, broken
    (tmp_path / ".drafts").mkdir()  # hidden: skipped, even a real workflow
    (tmp_path / ".drafts" / "bad.yaml").write_text("steps: []\n")
    result = fusion("validate", ".", cwd=tmp_path)
    assert result.returncode == 1
    assert "2 file(s) checked, 1 error(s) in 1 file(s)" in result.stderr
    assert result.stdout.startswith("broken.yaml:")
    # A file named explicitly is always checked.
    named = fusion("validate", "docker-compose.yml", cwd=tmp_path)
    assert named.returncode == 1
    assert "docker-compose.yml:1:1: services: unknown key 'services'" in named.stdout
