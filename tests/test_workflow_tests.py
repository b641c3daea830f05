"""`fusion test`: test cases beside workflows, run as a user runs them (the real CLI, real
files, the real compiler and runner); the predefined workflows' own cases all pass."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import fusion, run_main

from engine.testing.matchers import check_expected, match

ROOT = Path(__file__).resolve().parent.parent

GREET = """\
id: greet
input_schema:
  type: object
  properties:
    name: {type: string, minLength: 1}
    loud: {type: boolean, default: false}
  required: [name]
steps:
  - step_id: lookup
    type: template
    value: {score: 0.5, tags: [a, b]}
  - step_id: shout
    type: template
    when: "{{ input.loud }}"
    value: "{{ input.name | upper }}"
  - step_id: hello
    type: template
    value: "hello {{ steps.shout.output if steps.shout.ran else input.name }}"
output:
  text: "{{ steps.hello.output }}"
  sources: ["{{ steps.lookup.output }}"]
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    return run_main(capsys, "test", *args, "--workflows-dir", "")


@pytest.fixture
def greet(tmp_path: Path) -> Path:
    write(tmp_path, "greet.yaml", GREET)
    return tmp_path


# -- the predefined workflows ----------------------------------------------------------------
def test_the_predefined_workflows_cases_all_pass() -> None:
    result = fusion("test", "workflows", "--format", "json", cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    files = {Path(c["file"]).name for c in report["cases"]}
    assert files == {
        "multimodal_analysis.test.yaml",
        "rag_with_rerank.test.yaml",
        "sequential_summarization.test.yaml",
    }
    assert all(c["status"] == "passed" for c in report["cases"]), report
    assert report["summary"]["passed"] == len(report["cases"])


def test_test_files_are_not_workflows_to_validate() -> None:
    result = fusion("validate", "workflows", cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 file(s) checked" in result.stderr


# -- passing and failing ---------------------------------------------------------------------
def test_a_passing_case(greet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(
        greet,
        "greet.test.yaml",
        """\
cases:
  - name: plain
    input: {name: bob}
    expect:
      output: {text: hello bob, sources: [{score: 0.5, tags: [a, b]}]}
      steps:
        shout: {status: skipped}
        hello: {status: completed}
""",
    )
    code, out, err = run_cli(capsys, greet)
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0].startswith(f"PASS {greet / 'greet.test.yaml'}::plain (")
    assert lines[-1].startswith("1 passed, 0 failed in ")


def test_a_failing_case_points_at_the_expectation(
    greet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test = write(
        greet,
        "greet.test.yaml",
        """\
cases:
  - name: loud
    input: {name: bob, loud: true}
    expect:
      output:
        text: hello bob
        sources: [{score: 0.7, tags: [a, b]}]
""",
    )
    code, out, _ = run_cli(capsys, test)
    assert code == 1
    assert out.splitlines()[:3] == [
        f"FAIL {test}::loud " + out.splitlines()[0].split("::loud ")[1],
        f'    {test}:6:15: output.text: expected "hello bob", got "hello BOB"',
        f"    {test}:7:27: output.sources[0].score: expected 0.7, got 0.5",
    ]
    assert out.splitlines()[-1].startswith("0 passed, 1 failed in ")


def test_a_steps_output_is_checked(greet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test = write(
        greet,
        "greet.test.yaml",
        """\
cases:
  - name: outputs
    input: {name: bob, loud: true}
    expect:
      steps:
        lookup: {output: {score: 0.5, tags: {$contains: b}}}
        shout: {status: completed, output: BOB}
  - name: wrong output
    input: {name: bob}
    expect:
      steps:
        lookup: {output: {$partial: {score: 0.7}}}
        shout: {output: null}
        hello: {output: hello BOB}
""",
    )
    code, out, _ = run_cli(capsys, test)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"PASS {test}::outputs (")
    assert lines[1].startswith(f"FAIL {test}::wrong output (")
    assert lines[2:4] == [
        f"    {test}:12:45: steps.lookup.output.score: expected 0.7, got 0.5",
        f'    {test}:14:25: steps.hello.output: expected "hello BOB", got "hello bob"',
    ]
    assert lines[-1].startswith("1 passed, 1 failed in ")


def test_a_wrong_status_names_the_failing_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        tmp_path,
        "boom.yaml",
        """\
steps:
  - step_id: bad
    type: template
    value: "{{ input.missing.deeper }}"
""",
    )
    write(tmp_path, "boom.test.yaml", "cases:\n  - name: runs\n")
    code, out, _ = run_cli(capsys, tmp_path)
    assert code == 1
    assert "<workflow>" not in out
    assert ":2:5: status: expected status completed, got failed (step 'bad' failed:" in out


def test_a_failed_run_can_be_expected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(
        tmp_path,
        "boom.yaml",
        'steps:\n  - step_id: bad\n    type: template\n    value: "{{ input.x.y }}"\n',
    )
    write(
        tmp_path,
        "boom.test.yaml",
        """\
cases:
  - name: fails
    expect:
      error: {$regex: "^step 'bad' failed"}
      steps: {bad: {status: failed, error: {$any: true}}}
""",
    )
    code, out, err = run_cli(capsys, tmp_path)
    assert code == 0, out + err


# -- mocks -----------------------------------------------------------------------------------
def test_mocks_inline_and_from_a_file(greet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(greet, "fixtures/lookup.json", json.dumps({"score": 0.9}))
    write(
        greet,
        "greet.test.yaml",
        """\
cases:
  - name: inline
    input: {name: bob}
    mocks: {hello: hi there}
    expect:
      output: {text: hi there, sources: [{$any: true}]}
      steps: {hello: {mocked: true}}
  - name: from a file
    input: {name: bob}
    mocks: {lookup: {file: fixtures/lookup.json}}
    expect:
      output: {$partial: {sources: [{score: 0.9}]}}
""",
    )
    code, out, err = run_cli(capsys, greet)
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("2 passed, 0 failed")


def test_a_mocked_model_step_needs_no_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        tmp_path,
        "ask.yaml",
        """\
models:
  generation: {type: lm}
steps:
  - step_id: answer
    type: model_call
    model_id: "{{ models.generation }}"
    operation: chat
    input: {prompt: hello}
output: "{{ steps.answer.output.content }}"
""",
    )
    write(
        tmp_path,
        "ask.test.yaml",
        """\
cases:
  - name: mocked
    mocks: {answer: {content: hi, finish_reason: stop}}
    expect: {output: hi}
""",
    )
    code, out, err = run_cli(capsys, tmp_path)
    assert code == 0, out + err


def test_models_bind_ids_where_no_step_calls_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        tmp_path,
        "opt.yaml",
        """\
models:
  rerank: {type: lm, optional: true}
steps:
  - step_id: rerank
    type: template
    when: "{{ models.rerank }}"
    value: "{{ models.rerank }}"
output: "{{ steps.rerank.output }}"
""",
    )
    write(
        tmp_path,
        "opt.test.yaml",
        """\
cases:
  - name: bound
    models: {rerank: my-reranker}
    expect: {output: my-reranker}
  - name: unbound
    expect: {output: null, steps: {rerank: {status: skipped}}}
  - name: echo is a label too when no step calls a model
    models: {rerank: echo}
    expect: {output: echo}
""",
    )
    code, out, err = run_cli(capsys, tmp_path)
    assert code == 0, out + err
    assert err == ""  # no engine started, nothing loaded


# -- cases that load models ----------------------------------------------------------------
ASK = """\
id: ask
models:
  generation: {type: lm}
input_schema:
  type: object
  properties: {question: {type: string}}
steps:
  - step_id: answer
    type: model_call
    model_id: "{{ models.generation }}"
    operation: chat
    input:
      messages:
        - {role: system, content: Answer briefly.}
        - {role: user, content: "{{ input.question }}"}
      max_tokens: 8
output: "{{ steps.answer.output.content }}"
"""


def test_cases_on_echo_share_one_engine_and_one_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "ask.yaml", ASK)
    write(
        tmp_path,
        "ask.test.yaml",
        """\
cases:
  - name: first
    input: {question: Tell me about MLX}
    models: {generation: echo}
    expect:
      output: Tell me about MLX
      steps:
        answer:
          status: completed
          model: echo
          output: {$partial: {content: Tell me about MLX, finish_reason: stop}}
  - name: mocked, loads nothing
    mocks: {answer: {content: hi, finish_reason: stop}}
    expect: {output: hi}
  - name: second
    input: {question: And arrays}
    models: {generation: echo}
    expect: {output: And arrays}
""",
    )
    write(tmp_path, "more/ask.yaml", ASK.replace("id: ask", "id: ask_again"))
    write(
        tmp_path,
        "more/ask.test.yaml",
        "cases:\n  - name: third\n    input: {question: Why not}\n"
        "    models: {generation: echo}\n    expect: {output: Why not}\n",
    )
    code, out, err = run_cli(capsys, tmp_path)
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("4 passed, 0 failed")
    # One engine for the whole command, the echo model loaded once for the three cases.
    assert err.splitlines()[:2] == [
        "starting an engine for the cases' models",
        "loading echo model echo",
    ]
    assert err.count("starting an engine") == 1
    assert err.count("loading ") == 1


def test_a_case_on_a_model_directory(
    tmp_path: Path, tiny_lm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "ask.yaml", ASK)
    relative = os.path.relpath(tiny_lm_dir, tmp_path)  # as written: relative to the test file
    write(
        tmp_path,
        "ask.test.yaml",
        f"""\
cases:
  - name: a tiny random model answers in at most 8 tokens
    input: {{question: Hello}}
    models: {{generation: {relative}}}
    expect:
      output: {{$schema: {{type: string}}}}
      steps:
        answer:
          status: completed
          model: lm
          output:
            $partial:
              usage:
                $partial:
                  completion_tokens: {{$schema: {{type: integer, minimum: 1, maximum: 8}}}}
""",
    )
    code, out, err = run_cli(capsys, tmp_path)
    assert code == 0, out + err
    assert f"loading lm model {tmp_path / relative}" in err.splitlines()


def test_a_required_role_without_a_model_is_a_case_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        tmp_path,
        "two.yaml",
        ASK.replace("id: ask", "id: two").replace(
            "  generation: {type: lm}\n", "  generation: {type: lm}\n  judge: {type: lm}\n"
        ),
    )
    write(
        tmp_path,
        "two.test.yaml",
        "cases:\n  - name: judge unbound\n    models: {generation: echo}\n",
    )
    code, out, err = run_cli(capsys, tmp_path)
    assert code == 1, out + err
    test = tmp_path / "two.test.yaml"
    assert out.splitlines()[:2] == [
        f"ERROR {test}::judge unbound",
        f"    {test}:3:13: cases[0].models: no 'lm' model to run 'two': pass models: "
        "{judge: DIR} (a model directory), models: {judge: echo}, or mock the steps that "
        "use role 'judge'",
    ]
    assert "Traceback" not in out + err


# -- which workflow, and the workflows it calls ---------------------------------------------
def test_workflow_by_file_or_id_and_child_workflows_resolve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        tmp_path,
        "child.yaml",
        "id: child\nsteps:\n  - step_id: v\n    type: template\n    value: "
        '"child of {{ input.who }}"\noutput: "{{ steps.v.output }}"\n',
    )
    write(
        tmp_path,
        "parent.yaml",
        """\
id: parent
steps:
  - step_id: call
    type: workflow
    workflow: child
    input: {who: parent}
output: "{{ steps.call.output }}"
""",
    )
    cases = "cases:\n  - name: calls\n    expect: {output: child of parent}\n"
    write(tmp_path, "suite.test.yaml", "workflow: parent\n" + cases)
    write(tmp_path, "other.test.yaml", "workflow: parent.yaml\n" + cases)
    code, out, err = run_cli(capsys, tmp_path)
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("2 passed, 0 failed")


# -- broken test files -------------------------------------------------------------------------
def test_a_broken_test_file_is_an_error_at_file_line_col(
    greet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test = write(
        greet,
        "greet.test.yaml",
        """\
cases:
  - name: typos
    inputs: {name: bob}
    mocks: {helo: x}
    expect:
      output: {$regexp: x}
      steps: {hello: {statu: completed}}
  - name: bad input
    input: {name: ""}
  - name: bad matchers
    input: {name: bob}
    expect:
      status: done
      output: {text: {$regex: "(a"}, n: {$any: false}, s: {$schema: {type: 3}}}
  - name: bad input
    input: {name: x}
""",
    )
    code, out, err = run_cli(capsys, test)
    assert code == 1
    assert "Traceback" not in out + err
    assert out.splitlines() == [
        f"ERROR {test}::typos",
        f"    {test}:3:5: cases[0].inputs: unknown key 'inputs' in a case (did you mean 'input'?)",
        f"    {test}:6:16: cases[0].expect.output.$regexp: unknown matcher '$regexp' "
        "(did you mean '$regex'?)",
        f"    {test}:7:23: cases[0].expect.steps.hello.statu: unknown key 'statu' in a "
        "step's expectation (did you mean 'status'?)",
        f"ERROR {test}::bad input",
        f"    {test}:9:19: cases[1].input.name: '' should be non-empty",
        f"ERROR {test}::bad matchers",
        f"    {test}:13:15: cases[2].expect.status: status must be one of completed, partial, "
        "failed",
        f"    {test}:14:23: cases[2].expect.output.text.$regex: $regex '(a' is not a regular "
        "expression: missing ), unterminated subpattern at position 0",
        f"    {test}:14:42: cases[2].expect.output.n.$any: $any takes true",
        f"    {test}:14:70: cases[2].expect.output.s.$schema.type: $schema is not a valid "
        "JSON Schema: 3 is not valid under any of the given schemas",
        f"ERROR {test}::bad input",
        f"    {test}:15:11: cases[3].name: duplicate case name 'bad input' (first at line 8)",
        "0 passed, 0 failed, 4 error(s) in " + out.splitlines()[-1].split(" in ")[1],
    ]


def test_a_mock_of_no_step_is_an_error_with_a_hint(
    greet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test = write(
        greet,
        "greet.test.yaml",
        "cases:\n  - name: m\n    input: {name: a}\n    mocks: {helo: x}\n",
    )
    code, out, _ = run_cli(capsys, test)
    assert code == 1
    assert (
        f"    {test}:4:13: cases[0].mocks.helo: workflow 'greet' has no step 'helo' "
        "(did you mean 'hello'?)"
    ) in out.splitlines()


ONE_CASE = "cases:\n  - name: x\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cases: [\n", ":2:1: <root>: YAML syntax error"),
        ("- name: x\n", ":1:1: <root>: a test file is a mapping with a non-empty 'cases'"),
        ("cases: []\n", ":1:8: cases: a test file is a mapping with a non-empty 'cases' list"),
        ("workflow: nope.yaml\n" + ONE_CASE, ":1:11: workflow: no such workflow file: "),
        ("workflow: gret\n" + ONE_CASE, ":1:11: workflow: no workflow 'gret' in "),
        (ONE_CASE + "wrkflow: x\n", ":3:1: wrkflow: unknown key 'wrkflow' in a test file"),
    ],
)
def test_a_test_file_that_cannot_run_is_one_error(
    greet: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    test = write(greet, "greet.test.yaml", text)
    code, out, err = run_cli(capsys, test)
    assert code == 1, out + err
    assert out.splitlines()[0] == f"ERROR {test}"
    assert out.splitlines()[1].startswith(f"    {test}{message}")


def test_a_test_file_without_its_workflow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test = write(tmp_path, "lonely.test.yaml", "cases:\n  - name: x\n")
    code, out, _ = run_cli(capsys, test)
    assert code == 1
    assert f"{test}:1:1: <root>: no workflow file beside it (lonely.yaml)" in out


def test_a_broken_workflow_reports_its_own_issues(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "bad.yaml", "steps:\n  - step_id: a\n    type: nosuch\n")
    write(tmp_path, "bad.test.yaml", "cases:\n  - name: x\n")
    code, out, _ = run_cli(capsys, tmp_path)
    assert code == 1
    assert f"{tmp_path / 'bad.yaml'}:3:11: steps[0].type: unknown step type 'nosuch'" in out


# -- selection, format, usage ----------------------------------------------------------------
CASES_AB = """\
cases:
  - name: alpha
    input: {name: a}
    expect: {output: {$partial: {text: hello a}}}
  - name: beta
    input: {name: b}
    expect: {output: {$partial: {text: hello x}}}
"""


def test_k_selects_cases_by_substring(greet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(greet, "greet.test.yaml", CASES_AB)
    code, out, _ = run_cli(capsys, greet, "-k", "alph")
    assert code == 0
    assert [line.split(" (")[0] for line in out.splitlines()[:-1]] == [
        f"PASS {greet / 'greet.test.yaml'}::alpha"
    ]
    code, _, err = run_cli(capsys, greet, "-k", "gamma")
    assert code == 2
    assert "no test case matches -k 'gamma'" in err


def test_json_format(greet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test = write(greet, "greet.test.yaml", CASES_AB)
    code, out, _ = run_cli(capsys, greet / "greet.yaml", "--format", "json")
    assert code == 1
    report = json.loads(out)
    alpha, beta = report["cases"]
    assert (alpha["id"], alpha["case"], alpha["status"], alpha["problems"]) == (
        f"{test}::alpha",
        "alpha",
        "passed",
        [],
    )
    assert beta["status"] == "failed"
    (problem,) = beta["problems"]
    assert (problem["file"], problem["line"], problem["col"]) == (str(test), 7, 40)
    assert problem["key"] == "output.text"
    assert problem["message"] == 'expected "hello x", got "hello b"'
    summary = report["summary"]
    assert (summary["passed"], summary["failed"], summary["error"]) == (1, 1, 0)
    assert summary["duration_s"] >= 0


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, tmp_path / "nope")
    assert (code, err.strip()) == (2, f"error: no such test file or directory: {tmp_path / 'nope'}")
    write(tmp_path, "w.yaml", GREET)
    code, _, err = run_cli(capsys, tmp_path / "w.yaml")
    assert code == 2
    assert "no test file beside" in err
    code, _, err = run_cli(capsys, tmp_path)
    assert code == 2
    assert "no test cases found" in err


# -- matchers --------------------------------------------------------------------------------
SCHEMA = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}


@pytest.mark.parametrize(
    ("expected", "actual", "message"),
    [
        ({"a": 1}, {"a": 1.0}, None),
        ({"a": 1}, {"a": True}, "a: expected 1, got true"),
        ({"a": 1}, {"a": 1, "b": 2}, "<root>: unexpected key(s) 'b' (use $partial"),
        ({"ab": 1}, {"abc": 1}, "<root>: missing key 'ab' (did you mean 'abc'?)"),
        ([1, 2], [1, 2, 3], "<root>: expected 2 item(s), got 3: [1, 2, 3]"),
        ({"$any": True}, None, None),
        ({"$regex": "b+c"}, "abbcd", None),
        ({"$regex": "^b"}, "abc", "<root>: expected a match of '^b', got \"abc\""),
        ({"$regex": "x"}, 5, "<root>: expected a string matching 'x', got 5"),
        ({"$contains": "ell"}, "hello", None),
        ({"$contains": "z"}, "hello", '<root>: expected "hello" to contain "z"'),
        ({"$contains": {"$partial": {"id": 2}}}, [{"id": 1}, {"id": 2, "x": 0}], None),
        ({"$contains": 3}, [1, 2], "<root>: no item matches 3: [1, 2]"),
        ({"$contains": 3}, {"a": 3}, '<root>: expected a list containing 3, got {"a": 3}'),
        ({"$schema": SCHEMA}, {"n": 2}, None),
        ({"$schema": SCHEMA}, {"n": "2"}, "<root>: does not match the schema at /n: '2' is not"),
        ({"$partial": {"a": {"$regex": "^x"}}}, {"a": "xy", "b": 1}, None),
        ({"$partial": {"a": {"b": 1}}}, {"a": {"b": 1, "c": 2}}, "a: unexpected key(s) 'c'"),
        ({"$partial": {"a": 1}}, [1], "<root>: expected a mapping, got [1]"),
    ],
)
def test_matchers(expected: Any, actual: Any, message: str | None) -> None:
    assert list(check_expected(expected, ())) == []
    found = [
        f"{'.'.join(map(str, m.path)) or '<root>'}: {m.message}"
        for m in match(expected, actual, (), ())
    ]
    if message is None:
        assert found == []
    else:
        assert any(f.startswith(message) for f in found), found


@pytest.mark.parametrize(
    ("expected", "message"),
    [
        ({"$any": True, "x": 1}, "a matcher is a mapping with one key: $any has x beside it"),
        ({"$contain": 1}, "unknown matcher '$contain' (did you mean '$contains'?)"),
        ({"$nope": 1}, "unknown matcher '$nope' (matchers: $any, $regex, $contains"),
        ({"$regex": "(?=a)"}, "$regex pattern '(?=a)' is refused"),
        ({"$regex": 3}, "$regex takes a string"),
        ({"$schema": {"$ref": "http://x"}}, "$schema: $ref 'http://x' is refused"),
        ({"$partial": [1]}, "$partial takes a mapping"),
        ([{"a": {"$contains": {"$any": 1}}}], "$any takes true"),
    ],
)
def test_malformed_matchers(expected: Any, message: str) -> None:
    (problem,) = list(check_expected(expected, ()))
    assert problem[0].startswith(message), problem
