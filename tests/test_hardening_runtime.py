"""Issue #8, findings 2, 3, 4, 5 (fan-out) and 8, at the engine: templates outside the
provably linear subset render in the sandbox under a time and memory budget, per-run
budgets bound steps, for_each and output, input schemas fetch nothing and match patterns
in linear time. Each reproduction is the attack of the issue, scaled to a small budget."""

from __future__ import annotations

import asyncio
import socket
import tracemalloc
from typing import Any

import pytest
from engine_helpers import catalog_of, compile_yaml, make_runner, run_yaml, statuses, trace

from engine.dsl.input_schema import is_linear, schema_issues
from engine.dsl.issues import WorkflowInvalid
from engine.dsl.templating import Template
from engine.errors import InvalidRequest
from engine.runtime.executor import RunLimits
from engine.runtime.inputs import prepare_input
from engine.sandbox import Budget, Sandbox, SandboxLimits

RENDER = "engine.dsl.rendering:render_batch"
SMALL = RunLimits(render=Budget(timeout_s=1.5, memory_mb=64), schemas=Budget(1.5, 64))


def one_step(value: str) -> str:
    return f"""
    id: t
    steps:
      - step_id: s
        type: template
        value: {value!r}
    """


async def run_one(value: str, limits: RunLimits = SMALL, **kwargs: Any) -> Any:
    result = await run_yaml(one_step(value), runner=make_runner(limits=limits), **kwargs)
    return result, trace(result)["s"]


@pytest.mark.parametrize(
    ("source", "budget"),
    [
        # Jinja's ** is left-associative: (10**256)**256 is small, its **256 is not.
        ("{{ (10**256**256**256) > 1 }}", "time"),
        ("{% set s = 'a' * 1000000 %}{% for i in range(200) %}{{ s }}{% endfor %}", "memory"),
        ("{{ (['x' * 1000000] * 200) | join }}", "memory"),
        ("{% set s = 'x' * 1000000 %}{{ " + " ~ ".join(["s"] * 200) + " }}", "memory"),
        # whichever budget it reaches first
        ("{% set s = ['x' * 1000000] %}{{ (" + " + ".join(["s"] * 150) + ") | join }}", ""),
        ("{{ range(200) | map('string') | map('center', 999999) | join }}", "memory"),
        ("{{ '%999999d' * 200 % ((1,) * 200) }}", "memory"),
        ("{{ (['x' * 1000000] * 200) | batch(1) | list }}", "memory"),
        ("{{ (['x' * 1000000] * 200) | slice(3) | list | string }}", "memory"),
    ],
)
async def test_template_bombs_fail_the_step_within_the_budget(source: str, budget: str) -> None:
    assert not Template(source, frozenset()).linear
    result, step = await run_one(source)  # run_yaml fails it, rather than hang, past WAIT_S
    assert result.status == "failed"
    assert step.status == "failed"
    # The budget is what stopped it: the error names the budget the sandbox enforced.
    assert f"{budget} budget".strip() in step.error


async def test_event_loop_stays_free_while_a_template_burns() -> None:
    """A concurrent coroutine keeps ticking while the bomb runs: nothing runs on the loop.

    Ordering, not speed: the bomb never ends by itself, so a run that rendered on the loop
    would hold it from its first render to its end, and the ticker could turn only in the
    few awaits before that. Ticking TICKS times before the run ends means the loop was free
    while the bomb burned (in the sandbox, until its time budget)."""
    ticks = 0
    run = asyncio.create_task(run_one("{{ (10**256**256**256) > 1 }}"))

    async def ticker() -> None:
        nonlocal ticks
        while not run.done():
            ticks += 1
            await asyncio.sleep(0.01)

    await ticker()
    result, step = await run
    assert result.status == "failed"
    assert "time budget" in step.error
    assert ticks >= 10


async def test_step_timeout_covers_rendering() -> None:
    text = """
    id: t
    steps:
      - step_id: s
        type: template
        timeout_s: 0.5
        value: "{{ (10**256**256**256) > 1 }}"
    """
    result = await run_yaml(text, runner=make_runner(limits=RunLimits()))
    assert "exceeded its time budget of 0.5 s" in trace(result)["s"].error


async def test_ordinary_templates_render_in_process() -> None:
    linear = [
        "{{ input.query }}",
        "Q: {{ input.q }} A: {{ steps.a.output.content }}",
        "{{ steps.rerank.output if steps.rerank.ran else steps.retrieve.output }}",
        "{{ input.n - 1 }}",
        "{{ [input.n] + (steps.deeper.output if steps.deeper.ran else []) }}",
        "{{ input.collection | default('default') | lower }}",
    ]
    assert all(Template(s, frozenset({"input", "steps"})).linear for s in linear)
    sandboxed = ["{{ x * 2 }}", "{{ x ** 2 }}", "{{ '%s' % x }}", "{% for i in x %}{% endfor %}"]
    assert not any(Template(s, frozenset({"x"})).linear for s in sandboxed)


async def test_dict_update_cannot_mutate_the_run_input() -> None:
    given = {"q": "original"}
    _, step = await run_one("{{ dict.update(input, {'q': 'changed'}) }}", input=given)
    assert step.status == "failed"
    assert given == {"q": "original"}


async def test_sandboxed_templates_see_only_what_they_read_and_render_right() -> None:
    text = """
    id: t
    input_schema: {type: object}
    steps:
      - step_id: a
        type: template
        value: {n: 3, words: [x, y]}
      - step_id: b
        type: template
        value: "{% for w in steps.a.output.words %}{{ w * steps.a.output.n }}{% endfor %}"
      - step_id: c
        type: template
        value: "{{ steps.a.output.words | map('upper') | list }}"
    output: {b: "{{ steps.b.output }}", c: "{{ steps.c.output }}", n: "{{ input.n ** 2 }}"}
    """
    result = await run_yaml(text, {"n": 4}, runner=make_runner(limits=SMALL))
    assert result.status == "completed", result.error
    assert result.output == {"b": "xxxyyy", "c": ["X", "Y"], "n": 16}


async def test_for_each_length_is_bounded() -> None:
    text = """
    id: t
    steps:
      - step_id: s
        type: template
        for_each: "{{ range(50) | list }}"
        value: "{{ item }}"
    """
    result = await run_yaml(text, runner=make_runner(limits=RunLimits(max_for_each_items=40)))
    assert "50 items, more than the limit of 40" in trace(result)["s"].error


async def test_self_calling_workflow_cannot_fan_out_exponentially() -> None:
    """Each level maps itself over 4 items: 4**8 calls within the depth limit, without the
    run's step budget; with it the tree stops after a bounded number of executions."""
    catalog = catalog_of(
        """
        id: bomb
        steps:
          - step_id: fan
            type: workflow
            for_each: [1, 2, 3, 4]
            workflow: bomb
        """
    )
    runner = make_runner(catalog=catalog, limits=RunLimits(max_steps=200), max_depth=8)
    result = await asyncio.wait_for(runner.run(catalog.get("bomb")), 30)
    assert result.status == "failed"
    assert "budget of 200 step executions" in result.error


async def test_outputs_are_bounded() -> None:
    limits = RunLimits(max_step_output_bytes=10_000, max_output_bytes=20_000)
    result, step = await run_one("{{ 'x' * 20000 }}", limits=limits)
    assert "exceeds the limit of 10000" in step.error
    text = """
    id: t
    steps:
      - {step_id: a, type: template, value: "{{ 'x' * 9000 }}"}
      - {step_id: b, type: template, value: "{{ 'y' * 9000 }}"}
      - {step_id: c, type: template, value: "{{ 'z' * 9000 }}"}
    output: "{{ [steps.a.output, steps.b.output, steps.c.output] }}"
    """
    result = await run_yaml(text, runner=make_runner(limits=limits))
    assert statuses(result) == {"a": "completed", "b": "completed", "c": "completed"}
    assert result.output is None
    assert "exceed the run's limit of 20000" in result.error


async def test_an_output_sharing_one_value_is_measured_without_encoding_it() -> None:
    """200 items each return the same 2 MB input string: the size check must not build
    their 400 MB of JSON to know it exceeds the limit (with run_max_for_each_items of
    them, the encoding would take 40 GB). Memory, not time: the peak stays far below it."""
    text = """
    id: t
    steps:
      - step_id: s
        type: template
        for_each: "{{ input.items }}"
        value: "{{ input.big }}"
    """
    given = {"items": list(range(200)), "big": "x" * 2_000_000}
    tracemalloc.start()
    try:
        result = await run_yaml(text, given, runner=make_runner(limits=RunLimits()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "output of 400000601 bytes exceeds the limit" in trace(result)["s"].error
    assert peak < 100_000_000


# -- input schemas ---------------------------------------------------------------------------
def workflow_with_schema(schema: str) -> str:
    return f"""
    id: t
    input_schema: {schema}
    steps:
      - {{step_id: s, type: template, value: "{{{{ input }}}}"}}
    """


@pytest.fixture
def listener() -> Any:
    """A loopback listener that accepts and never answers: contacting it would hang."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def accepted(server: socket.socket) -> bool:
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


@pytest.mark.parametrize(
    "ref",
    [
        "http://127.0.0.1:{port}/schema.json",
        "file:///etc/passwd",
        "file:///nonexistent/schema.json",
        "other.json#/x",
    ],
)
def test_remote_and_file_refs_are_compile_errors(ref: str, listener: socket.socket) -> None:
    ref = ref.format(port=listener.getsockname()[1])
    schema = f'{{type: object, properties: {{q: {{"$ref": "{ref}"}}}}}}'
    with pytest.raises(WorkflowInvalid) as info:
        compile_yaml(workflow_with_schema(schema))
    [issue] = info.value.issues
    assert issue.path == ("input_schema", "properties", "q", "$ref")
    assert "only local references" in issue.message
    assert not accepted(listener)


async def test_local_refs_still_work() -> None:
    schema = '{type: object, "$defs": {q: {type: string}}, properties: {q: {"$ref": "#/$defs/q"}}}'
    wf = compile_yaml(workflow_with_schema(schema))
    assert await prepare_input(wf.input_schema, {"q": "x"}, Budget()) == {"q": "x"}
    with pytest.raises(InvalidRequest) as info:
        await prepare_input(wf.input_schema, {"q": 1}, Budget())
    assert info.value.param == "input/q"


async def test_redos_pattern_runs_in_linear_time() -> None:
    """Python's re takes seconds on 28 a's and a '!'; RE2 answers at once."""
    wf = compile_yaml(workflow_with_schema('{type: object, properties: {q: {pattern: "^(a+)+$"}}}'))
    assert is_linear(wf.input_schema)  # RE2 patterns validate in-process
    # Python's re would not finish on this in a lifetime: a hang, which pytest-timeout ends.
    with pytest.raises(InvalidRequest) as info:
        await prepare_input(wf.input_schema, {"q": "a" * 5000 + "!"}, Budget())
    assert "does not match" in info.value.message
    assert len(info.value.message) < 400  # the instance is not echoed whole


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ('{properties: {q: {pattern: "(a)\\\\1"}}}', ("properties", "q", "pattern")),
        ('{properties: {q: {pattern: "(?=a)a"}}}', ("properties", "q", "pattern")),
        ('{patternProperties: {"(?!x)": {}}}', ("patternProperties", "(?!x)")),
        (
            '{patternProperties: {"^a": {}}, unevaluatedProperties: false}',
            ("unevaluatedProperties",),
        ),
    ],
)
def test_patterns_re2_cannot_run_are_refused(schema: str, where: tuple[str, ...]) -> None:
    issues = list(schema_issues(compile_yaml(workflow_with_schema("{}")).input_schema))
    assert issues == []
    with pytest.raises(WorkflowInvalid) as info:
        compile_yaml(workflow_with_schema(schema))
    assert [i.path for i in info.value.issues] == [("input_schema", *where)]


async def test_pattern_properties_and_additional_properties_use_re2() -> None:
    schema = '{patternProperties: {"^(a+)+$": {type: integer}}, additionalProperties: false}'
    wf = compile_yaml(workflow_with_schema(schema))
    # Python's re would not finish matching this key in a lifetime: the schema budget would
    # stop it with another message, or (in-process) it would hang until pytest-timeout.
    with pytest.raises(InvalidRequest) as info:
        await prepare_input(wf.input_schema, {"a" * 5000 + "!": 1}, Budget())
    assert "additional properties are not allowed" in info.value.message
    assert await prepare_input(wf.input_schema, {"aaa": 1}, Budget()) == {"aaa": 1}


async def test_exponential_schema_validation_is_stopped_by_its_budget() -> None:
    """oneOf evaluates every branch: two branches per level, 2**24 evaluations."""
    schema = '{type: array, items: {oneOf: [{"$ref": "#"}, {"$ref": "#"}]}}'
    wf = compile_yaml(workflow_with_schema(schema))
    assert not is_linear(wf.input_schema)
    nested: Any = []
    for _ in range(24):
        nested = [nested]
    with pytest.raises(InvalidRequest) as info:
        await prepare_input(wf.input_schema, {"x": nested}, Budget(timeout_s=1.0))
    # the schema is not an object schema at the top: the array check fails first, cheaply
    assert info.value.param == "input"
    with pytest.raises(InvalidRequest) as info:
        await prepare_input({**wf.input_schema, "type": "array"}, nested, Budget(timeout_s=1.0))
    assert "schema budget of 1 s" in info.value.message  # the budget stopped it


@pytest.mark.parametrize(
    "expression", ["(" * 200 + "1" + ")" * 200, "[" * 200 + "]" * 200, "1" + " + 1" * 2000]
)
def test_deeply_nested_templates_are_compile_errors(expression: str) -> None:
    """Jinja's parser recurses per level: RecursionError was a 500 at compile time."""
    with pytest.raises(WorkflowInvalid) as info:
        compile_yaml(one_step("{{ " + expression + " }}"))
    assert "nests too deeply" in info.value.issues[0].message


async def test_cancelling_a_sandboxed_call_kills_its_computation() -> None:
    """A caller that leaves (a client disconnect cancels its task) frees the worker at once:
    with one worker, the next call does not wait for the abandoned bomb's budget.

    Relative to the budget, not the machine: the bomb never ends and its budget is an hour,
    so only a killed and replaced worker lets the quick call answer within the guard."""
    sandbox = Sandbox(SandboxLimits(workers=1))
    bomb = {"templates": ["{{ (10**256**256**256) > 1 }}"], "context": {}}
    try:
        with pytest.raises(TimeoutError):  # wait_for cancels the call at its deadline
            await asyncio.wait_for(sandbox.call(RENDER, bomb, timeout_s=3600, memory_mb=512), 1.0)
        quick = {"templates": ["{{ [1, 2] | sum }}"], "context": {}}
        answer = sandbox.call(RENDER, quick, timeout_s=60, memory_mb=512)
        assert await asyncio.wait_for(answer, 60) == [3]
    finally:
        sandbox.close()
