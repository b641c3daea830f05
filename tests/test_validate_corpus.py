"""The invalid-workflow corpus: every file under tests/workflows/invalid/ must report exactly
the issues listed here -- the same number, each at its exact line and column, with its key
path (JSON pointer) and a message that says what is wrong. Files are compiled the way
`fusion validate` compiles them (engine.dsl.catalog.compile_files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.dsl.catalog import compile_files
from engine.dsl.discovery import candidates
from engine.dsl.issues import Issue
from engine.steps.registry import default_registry

HERE = Path(__file__).parent
INVALID = HERE / "workflows" / "invalid"
VALID = HERE / "workflows" / "valid"

Expected = tuple[int, int, str, str]  # line, column, JSON pointer, message substring

STEP_KEYS_HINT = "allowed: step_id, type, description, depends_on, when, for_each"

CASES: dict[str, list[Expected]] = {
    # -- YAML itself --------------------------------------------------------------------
    "yaml_syntax_error.yaml": [(6, 3, "", "YAML syntax error")],
    # An unclosed bracket is reported where it was opened, not at the end of the file.
    "yaml_unclosed_bracket.yaml": [(5, 12, "", "YAML syntax error")],
    "yaml_tab_indent.yaml": [(3, 1, "", "YAML syntax error")],
    "duplicate_key.yaml": [(6, 5, "", 'duplicate key "value" (first at line 5)')],
    # Refused at the alias that crosses the value budget, before anything is expanded.
    "yaml_alias_bomb.yaml": [(8, 10, "", "alias *a4 takes the document past 100000 values")],
    "yaml_too_deep.yaml": [(5, 73, "", "nests deeper than 64 levels (setting workflow_max_depth)")],
    "empty_file.yaml": [(1, 1, "", "a workflow must be a mapping with a 'steps' list")],
    "not_a_mapping.yaml": [(1, 1, "", "a workflow must be a mapping with a 'steps' list")],
    # -- the workflow schema ---------------------------------------------------------------
    "missing_steps.yaml": [(1, 1, "", "'steps' is a required property")],
    "steps_not_a_list.yaml": [(3, 3, "/steps", "is not of type 'array'")],
    "empty_steps.yaml": [(2, 8, "/steps", "must not be empty")],
    "schema_timeout_type.yaml": [
        (6, 16, "/steps/0/timeout_s", "'10s' is not of type 'number'"),
        (10, 16, "/steps/1/timeout_s", "0 is less than or equal to the minimum of 0"),
    ],
    "schema_on_error_enum.yaml": [
        (6, 15, "/steps/0/on_error", "'ignore' is not one of 'fail', 'continue'"),
    ],
    "schema_nested_objects.yaml": [
        (6, 23, "/steps/0/retry/attempts", "0 is less than the minimum of 1"),
        (
            6,
            26,
            "/steps/0/retry/backof",
            "unknown key 'backof' in 'retry' (did you mean 'backoff_s'?)",
        ),
        (11, 7, "/steps/1/repeat", "'max' is a required property"),
        (12, 5, "/steps/1/concurrency", "does nothing without 'for_each'"),
        (12, 18, "/steps/1/concurrency", "'many' is not of type 'integer'"),
        (13, 11, "/steps/1/when", "'yes' is not of type 'boolean' (or use a {{ template }})"),
    ],
    "schema_header_keys.yaml": [
        (1, 5, "/id", "'has spaces' is not a valid name: use letters, digits, '_', '.' and '-'"),
        (2, 10, "/version", "1.5 is not of type 'integer', 'string'"),
        (3, 9, "/config", "[1, 2] is not of type 'object'"),
        (5, 15, "/models/gen/type", "'llm' is not one of 'lm', 'multimodal', 'embeddings'"),
        (5, 30, "/models/gen/optional", "'yes' is not of type 'boolean'"),
        (5, 37, "/models/gen/size", "unknown key 'size' in 'gen'; allowed: type, optional"),
        (6, 3, "/models/2nd", "'2nd' is not a valid name: use letters, digits and '_'"),
        (8, 14, "/steps/0/step_id", "'not an id' is not a valid name"),
    ],
    "unknown_top_level_key.yaml": [
        (2, 1, "/inputs", "unknown key 'inputs' in a workflow (did you mean 'input_schema'?)"),
        (8, 1, "/outputs", "unknown key 'outputs' in a workflow (did you mean 'output'?)"),
    ],
    # -- step types and their parameters ------------------------------------------------------
    "unknown_step_type.yaml": [
        (4, 11, "/steps/0/type", "unknown step type 'templat' (did you mean 'template'?)"),
        (7, 11, "/steps/1/type", "unknown step type 'http_fetch'; known types: chunk,"),
    ],
    "unknown_parameter.yaml": [
        (
            6,
            5,
            "/steps/0/valeu",
            "unknown key 'valeu' for step type 'template' (did you mean 'value'?)",
        ),
        (
            7,
            5,
            "/steps/0/retries",
            "unknown key 'retries' for step type 'template' (did you mean 'retry'?)",
        ),
    ],
    "missing_required_parameter.yaml": [
        (3, 5, "/steps/0", "missing required parameter 'value' of step type 'template'"),
        (5, 5, "/steps/1", "missing required parameter 'workflow' of step type 'workflow'"),
    ],
    "missing_step_id_and_type.yaml": [
        (3, 5, "/steps/0", "missing 'step_id'"),
        (5, 5, "/steps/1", "missing 'type'"),
        (7, 5, "/steps/2", "missing 'step_id'"),
        (7, 5, "/steps/2", "missing 'type'"),
        (8, 5, "/steps/3", "a step must be a mapping with 'step_id' and 'type'"),
    ],
    "duplicate_step_id.yaml": [
        (6, 14, "/steps/1/step_id", "duplicate step_id 'fetch' (first defined at line 3)"),
    ],
    # -- references and the graph -----------------------------------------------------------
    "reference_missing_step.yaml": [
        (
            8,
            12,
            "/steps/1/value",
            "reference to unknown step 'retreive' (did you mean 'retrieve'?)",
        ),
        (10, 11, "/output/answer", "reference to unknown step 'answr' (did you mean 'answer'?)"),
    ],
    "reference_unknown_attribute.yaml": [
        (8, 12, "/steps/1/value", "step 'x' has no attribute 'outptu' (did you mean 'output'?)"),
    ],
    "reference_dynamic_step.yaml": [
        (8, 12, "/steps/1/value", "with a literal step id"),
        (11, 12, "/steps/2/value", "not 'steps' alone"),
    ],
    "cycle.yaml": [(3, 14, "/steps/0/step_id", "dependency cycle: a -> b -> a")],
    # `start` feeds the cycle but is not in it; depends_on edges count as references do.
    "cycle_three.yaml": [
        (6, 14, "/steps/1/step_id", "dependency cycle: draft -> critique -> review -> draft"),
    ],
    "self_reference.yaml": [
        (5, 12, "/steps/0/value", "step 'loop' cannot read its own result"),
    ],
    "depends_on_missing.yaml": [
        (
            9,
            25,
            "/steps/1/depends_on/1",
            "depends_on names unknown step 'fetchh' (did you mean 'fetch'?)",
        ),
        (9, 33, "/steps/1/depends_on/2", "a step cannot depend on itself"),
    ],
    "undeclared_model_role.yaml": [
        (7, 12, "/steps/0/value", "undeclared model role 'generator' (did you mean 'generation'?)"),
    ],
    "unknown_workflow_and_inline.yaml": [
        (5, 15, "/steps/0/workflow", "unknown workflow 'summarise_docs'"),
        # An inline workflow is checked too, at its own lines; it cannot see its caller's steps.
        (11, 17, "/steps/1/workflow/steps/0/type", "unknown step type 'templte'"),
        (15, 18, "/steps/1/workflow/steps/1/value", "reference to unknown step 'call_missing'"),
    ],
    # -- templates ----------------------------------------------------------------------------
    "jinja_syntax_error.yaml": [
        (5, 12, "/steps/0/value", "template syntax error: expected token 'name'"),
        (8, 12, "/steps/1/value", "(template line 2)"),
        (13, 12, "/steps/2/value", "template syntax error: unexpected end of template"),
    ],
    "input_schema_invalid.yaml": [
        (
            5,
            19,
            "/input_schema/properties/query/type",
            "not a valid JSON Schema: 'strng' is not one of",
        ),
        (6, 44, "/input_schema/properties/pattern_field/pattern", "'(' is not a 'regex'"),
        (7, 13, "/input_schema/required", "'query' is not of type 'array'"),
    ],
    "for_each_mixed_text.yaml": [
        (5, 15, "/steps/0/for_each", "not text around a template"),
    ],
    "for_each_literal_string.yaml": [
        (5, 15, "/steps/0/for_each", "not 'input.xs' (did you mean '{{ input.xs }}'?)"),
    ],
    "for_each_join.yaml": [
        (5, 15, "/steps/0/for_each", "must give a list, but {{ input.xs | join(',') }} is string"),
        (9, 15, "/steps/1/for_each", "must give a list, but {{ 'abc' }} is string"),
        (13, 15, "/steps/2/for_each", "must give a list, but {{ input.xs | length }} is integer"),
    ],
    "for_each_number.yaml": [
        (5, 15, "/steps/0/for_each", "giving a list, not 3"),
    ],
    "unknown_name_item.yaml": [
        (5, 12, "/steps/0/value", "'item' is only defined inside a step with 'for_each'"),
        (8, 12, "/steps/1/value", "unknown name 'inptu' (did you mean 'input'?)"),
    ],
    "unknown_name_cycler.yaml": [
        (5, 12, "/steps/0/value", "unknown name 'cycler'"),
        (8, 12, "/steps/1/value", "unknown name 'joiner'"),
        (11, 12, "/steps/2/value", "unknown name 'lipsum'"),
    ],
    "escape_class.yaml": [
        (5, 12, "/steps/0/value", "attribute '__class__' is not allowed"),
    ],
    "escape_mro_subclasses.yaml": [
        (5, 12, "/steps/0/value", "is not allowed: names starting with '_' are private"),
        (8, 12, "/steps/1/value", "attribute '__subclasses__' is not allowed"),
        (11, 12, "/steps/2/value", "attribute '__mro__' is not allowed"),
    ],
    "escape_globals_subscript.yaml": [
        (5, 12, "/steps/0/value", "attribute '__globals__' is not allowed"),
        (9, 22, "/steps/1/value/nested/1", "attribute '_private' is not allowed"),
    ],
    "include_import_refused.yaml": [
        (5, 12, "/steps/0/value", "'include' is not allowed in workflow templates"),
        (8, 12, "/steps/1/value", "'import' is not allowed"),
        (11, 12, "/steps/2/value", "'import' is not allowed"),
        (14, 12, "/steps/3/value", "'extends' is not allowed"),
    ],
    "repeat_with_for_each.yaml": [
        (6, 5, "/steps/0/repeat", "'repeat' and 'for_each' cannot be combined"),
    ],
    # -- types: templates checked against step output schemas and input_schema ----------------
    "type_unknown_output_field.yaml": [
        (
            14,
            12,
            "/steps/1/input",
            "steps.answer.output has no field 'contnet' (did you mean "
            "'content'?); its type is object{content: string, finish_reason: string, usage:",
        ),
        (16, 10, "/output/usage", "steps.answer.output.usage has no field 'total'; its type is"),
        (
            17,
            10,
            "/output/count",
            "no field 'token' (did you mean 'tokens'?); its type is object{tokens: integer}",
        ),
    ],
    # Only names close to a declared key: input_schema lets a caller pass others.
    "type_unknown_input_field.yaml": [
        (10, 12, "/steps/0/value", "input has no field 'qeury' (did you mean 'query'?)"),
        (10, 12, "/steps/0/value", "input has no field 'limt' (did you mean 'limit'?)"),
    ],
    "type_index_and_fields_of_scalars.yaml": [
        (
            13,
            12,
            "/steps/1/value",
            "steps.hits.output is array<object{chunk_id: string, text: "
            "string, score: number, rerank_score: number, metadata: object}>: it has no field "
            "'text' (index an item first, e.g. [0], or iterate it)",
        ),
        (16, 12, "/steps/2/value", "input.limit is integer: it cannot be indexed"),
        (23, 12, "/steps/4/value", "steps.pieces.attempts is integer: it has no field 'count'"),
    ],
    "type_for_each_not_a_list.yaml": [
        (
            16,
            15,
            "/steps/1/for_each",
            "for_each must give a list, but {{ steps.answer.output }} is object{content: string",
        ),
        (20, 15, "/steps/2/for_each", "for_each must give a list, but {{ input.topic }} is string"),
        # A for_each step's output is the list of its items' outputs; `item` their type.
        (30, 12, "/steps/4/value", "item is array<string>: it has no field 'size'"),
    ],
    "type_compare_incompatible.yaml": [
        (
            17,
            11,
            "/steps/1/when",
            "cannot compare steps.count.output.tokens (integer) with 'ten' (string) using '>'",
        ),
        (
            18,
            12,
            "/steps/1/value",
            "cannot compare input.query (string) with input.min_tokens (integer) using '>='",
        ),
    ],
    "type_output_schema_mismatch.yaml": [
        (
            23,
            3,
            "/output",
            "output_schema is not met: the output has no 'sources', which the schema requires",
        ),
        (
            23,
            11,
            "/output/answer",
            "answer is object{prompt_tokens: integer, completion_tokens: "
            "integer, total_tokens: integer}, where the schema wants string",
        ),
        (25, 10, "/output/shape/text", "shape.text is string, where the schema wants integer"),
    ],
    "type_template_step_chain.yaml": [
        (
            8,
            12,
            "/steps/1/value",
            "steps.pair.output has no field 'rigth' (did you mean "
            "'right'?); its type is object{left: integer, right: array<string>}",
        ),
        (8, 12, "/steps/1/value", "steps.pair.output.left is integer: it has no field 'x'"),
        (11, 12, "/steps/2/value", "r is string: it has no field 'name'"),
    ],
    # -- JSON: the compose API's format, located the same way ------------------------------------
    "json_document.json": [
        (5, 40, "/steps/0/type", "unknown step type 'templat' (did you mean 'template'?)"),
        (9, 16, "/steps/1/value", "step 'embed_query' has no attribute 'outptu'"),
        (10, 20, "/steps/1/timeout_s", "'5' is not of type 'number'"),
        (11, 7, "/steps/1/top_k", "unknown key 'top_k' for step type 'template'"),
        (16, 58, "/steps/2/value/messages/0/content", "(did you mean 'retrieve_docs'?)"),
    ],
    "json_document_twin.yaml": [
        (5, 34, "/steps/0/type", "unknown step type 'templat' (did you mean 'template'?)"),
        (8, 12, "/steps/1/value", "step 'embed_query' has no attribute 'outptu'"),
        (9, 16, "/steps/1/timeout_s", "'5' is not of type 'number'"),
        (10, 5, "/steps/1/top_k", "unknown key 'top_k' for step type 'template'"),
        (16, 20, "/steps/2/value/messages/0/content", "(did you mean 'retrieve_docs'?)"),
    ],
    "json_syntax_error.json": [(4, 53, "", "YAML syntax error")],
    # -- everything at once: one run reports all fifteen ---------------------------------------
    "many_errors.yaml": [
        (
            2,
            1,
            "/descripton",
            "unknown key 'descripton' in a workflow (did you mean 'description'?)",
        ),
        (6, 9, "/input_schema/type", "input_schema is not a valid JSON Schema: 'objekt'"),
        (9, 11, "/steps/0/type", "unknown step type 'http_get'"),
        (13, 12, "/steps/1/value", "step 'fetch' has no attribute 'outptu'"),
        (14, 16, "/steps/1/timeout_s", "-1 is less than or equal to the minimum of 0"),
        (15, 15, "/steps/1/on_error", "'retry' is not one of 'fail', 'continue'"),
        (16, 14, "/steps/2/step_id", "duplicate step_id 'summarise' (first defined at line 11)"),
        (18, 12, "/steps/2/value", "undeclared model role 'writer'"),
        (21, 15, "/steps/3/for_each", "for_each must give a list, but"),
        (22, 12, "/steps/3/value", "attribute '__class__' is not allowed"),
        (23, 18, "/steps/3/depends_on/0", "unknown step 'sumarise' (did you mean 'summarise'?)"),
        (24, 14, "/steps/4/step_id", "dependency cycle: ping -> pong -> ping"),
        (32, 12, "/steps/6/value", "template syntax error"),
        (33, 5, "/steps/6/colour", "unknown key 'colour' for step type 'template'"),
        (35, 9, "/output/text", "reference to unknown step 'translat' (did you mean 'translate'?)"),
    ],
}


def _issues(path: Path) -> list[Issue]:
    compiled, issues = compile_files([path], default_registry())
    assert not compiled, f"{path.name} compiled although it is invalid"
    return issues[path]


def test_every_corpus_file_has_expectations() -> None:
    on_disk = {p.name for p in candidates(INVALID)}
    assert on_disk == set(CASES), "add the new file to CASES (or remove the stale entry)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_invalid_workflow_reports_exact_issues(name: str) -> None:
    path = INVALID / name
    issues = _issues(path)
    expected = CASES[name]
    got = [(i.line, i.col, i.pointer, i.message) for i in issues]
    assert [g[:3] for g in got] == [e[:3] for e in expected], "\n".join(map(str, got))
    for (line, col, pointer, message), (*_, substring) in zip(got, expected, strict=True):
        assert substring in message, f"{name}:{line}:{col} {pointer}: {message!r}"
    assert all(i.file == str(path) for i in issues)


def test_many_errors_are_all_reported_at_once() -> None:
    issues = _issues(INVALID / "many_errors.yaml")
    assert len(issues) == 15
    # Every step that has something wrong shows up; none hides the others.
    steps = {i.path[1] for i in issues if i.path[:1] == ("steps",)}
    assert steps == {0, 1, 2, 3, 4, 6}


def test_json_and_yaml_forms_report_the_same_issues() -> None:
    """The loader parses JSON with the same positioned loader: only positions differ."""

    def key(path: Path) -> list[tuple[str, str]]:
        return [(i.pointer, i.message) for i in _issues(path)]

    assert key(INVALID / "json_document.json") == key(INVALID / "json_document_twin.yaml")


def test_issue_text_names_file_line_col_and_key() -> None:
    (issue,) = _issues(INVALID / "reference_unknown_attribute.yaml")
    path = INVALID / "reference_unknown_attribute.yaml"
    assert issue.text().startswith(f"{path}:8:12: steps[1].value: step 'x' has no attribute")


def test_unknown_step_type_lists_known_types() -> None:
    issues = _issues(INVALID / "unknown_step_type.yaml")
    known = ", ".join(default_registry().names())
    assert "template, vector_search, workflow" in known  # the built-ins, sorted
    assert all(i.message.endswith(f"known types: {known}") for i in issues)


def test_unknown_step_key_lists_what_is_allowed() -> None:
    issues = _issues(INVALID / "unknown_parameter.yaml")
    assert all(STEP_KEYS_HINT in i.message and i.message.endswith(", value") for i in issues)


@pytest.mark.parametrize("path", candidates(VALID), ids=lambda p: p.name)
def test_valid_examples_compile_without_issues(path: Path) -> None:
    compiled, issues = compile_files(candidates(VALID), default_registry())
    assert issues.get(path, []) == []
    assert any(wf.file == str(path) for wf in compiled.values())
