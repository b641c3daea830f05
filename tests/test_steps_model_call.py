"""The `model_call` step type on real tiny models: chat (with streamed token events),
vision with an image, embed, count_tokens, and its errors."""

from __future__ import annotations

import math

import pytest
from jsonschema import Draft202012Validator
from step_helpers import (
    compile_workflow,
    png_data_uri,
    run_workflow,
    tiny_models_engine,  # noqa: F401  (provides the `engine` fixture)
)

from engine.dsl.issues import WorkflowInvalid
from engine.errors import InvalidRequest
from engine.models.backends.base import ChatParams
from engine.runtime.executor import Runner
from engine.services import Engine
from engine.steps.model_call import OUTPUT_SCHEMAS

pytestmark = pytest.mark.asyncio(loop_scope="module")


CHAT = """
    models:
      generation: {type: lm}
    steps:
      - step_id: answer
        type: model_call
        model_id: "{{ models.generation }}"
        operation: chat
        input:
          messages:
            - {role: system, content: You are terse.}
            - {role: user, content: "{{ input.question }}"}
          temperature: 0
          max_tokens: 12
    output: "{{ steps.answer.output }}"
"""


async def test_chat_output_and_token_events_in_order(engine: Engine) -> None:
    run = await run_workflow(engine, CHAT, {"question": "Name three colours."})
    assert run.status == "completed", run.result.error
    out = run.output
    assert set(out) == {"content", "finish_reason", "usage"}
    Draft202012Validator(OUTPUT_SCHEMAS["chat"]).validate(out)  # what the compiler types
    assert isinstance(out["content"], str)
    assert out["finish_reason"] in {"stop", "length"}
    usage = out["usage"]
    assert usage["prompt_tokens"] > 5  # the chat template wraps both messages
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert run.step("answer").model == "tiny-lm"

    # What a random-weight model says is noise, and its tokens may decode to nothing
    # (special tokens, half a UTF-8 character): only the relation between the events and
    # the output is asserted, never that there is text.
    tokens = run.of("token", "answer")
    assert len(tokens) <= usage["completion_tokens"]
    assert "".join(e["delta"] for e in tokens) == out["content"]
    assert all(e["delta"] and "index" not in e for e in tokens)
    # Streamed while the step runs: after its start, before its end.
    names = [(e["event"], e.get("step_id")) for e in run.events]
    started = names.index(("step_started", "answer"))
    finished = names.index(("step_finished", "answer"))
    assert all(started < i < finished for i, name in enumerate(names) if name[0] == "token")


async def test_chat_is_the_registrys_answer(engine: Engine) -> None:
    """Greedy decoding through the step equals the registry's own answer to the same
    messages and options: nothing is lost or added on the way."""
    question = "Why is the sky blue?"
    run = await run_workflow(engine, CHAT, {"question": question})
    direct = await engine.models.chat(
        "tiny-lm",
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": question},
        ],
        ChatParams(max_tokens=12, temperature=0),
    )
    assert run.output["content"] == direct.content
    assert run.output["usage"]["prompt_tokens"] == direct.prompt_tokens


async def test_prompt_form_system_and_max_tokens(engine: Engine) -> None:
    run = await run_workflow(
        engine,
        """
        steps:
          - step_id: with_system
            type: model_call
            model_id: tiny-lm
            operation: chat
            input: {prompt: hi, system: "{{ input.system }}", max_tokens: 3, temperature: 0}
          - step_id: without_system
            type: model_call
            model_id: tiny-lm
            operation: chat
            input: {prompt: hi, max_tokens: 3, temperature: 0}
        """,
        {"system": "Answer in one word only, please, and nothing else."},
    )
    assert run.status == "completed", run.result.error
    with_system, without_system = run.output["with_system"], run.output["without_system"]
    assert with_system["usage"]["completion_tokens"] <= 3
    # The system message is part of the prompt.
    assert with_system["usage"]["prompt_tokens"] > without_system["usage"]["prompt_tokens"] + 5
    # {prompt, system} is the two-message conversation.
    direct = await engine.models.chat(
        "tiny-lm",
        [
            {"role": "system", "content": "Answer in one word only, please, and nothing else."},
            {"role": "user", "content": "hi"},
        ],
        ChatParams(max_tokens=3, temperature=0),
    )
    assert with_system["content"] == direct.content


async def test_for_each_token_events_carry_the_item_index(engine: Engine) -> None:
    run = await run_workflow(
        engine,
        """
        steps:
          - step_id: many
            type: model_call
            for_each: "{{ input.prompts }}"
            concurrency: 2
            model_id: tiny-lm
            operation: chat
            input: {prompt: "{{ item }}", max_tokens: 4, temperature: 0}
        output: "{{ steps.many.output | map(attribute='content') | list }}"
        """,
        {"prompts": ["one", "two", "three"]},
    )
    assert run.status == "completed", run.result.error
    for index, content in enumerate(run.output):
        deltas = [e["delta"] for e in run.of("token", "many") if e["index"] == index]
        assert "".join(deltas) == content


async def test_vision_with_a_data_uri_image(engine: Engine) -> None:
    workflow = """
        steps:
          - step_id: look
            type: model_call
            model_id: tiny-vlm
            operation: vision
            input:
              prompt: "{{ input.prompt }}"
              image_url: "{{ input.image }}"
              max_tokens: 4
              temperature: 0
          - step_id: text_only
            type: model_call
            model_id: tiny-vlm
            operation: chat
            input: {prompt: "{{ input.prompt }}", max_tokens: 4, temperature: 0}
    """
    run = await run_workflow(
        engine, workflow, {"prompt": "What colour is this?", "image": png_data_uri()}
    )
    assert run.status == "completed", run.result.error
    look, text_only = run.output["look"], run.output["text_only"]
    assert isinstance(look["content"], str)
    assert 1 <= look["usage"]["completion_tokens"] <= 4
    # The image reached the model: its tokens are part of the prompt.
    assert look["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"]
    # Greedy, so the answer does not depend on the random state earlier tests left; and
    # the tokens streamed are the content, however little of it decodes to text.
    deltas = [e["delta"] for e in run.of("token", "look")]
    assert len(deltas) <= look["usage"]["completion_tokens"]
    assert "".join(deltas) == look["content"]


async def test_vision_with_an_unreadable_image_fails(engine: Engine) -> None:
    run = await run_workflow(
        engine,
        """
        steps:
          - step_id: look
            type: model_call
            model_id: tiny-vlm
            operation: vision
            input:
              messages:
                - role: user
                  content:
                    - {type: text, text: "what is this?"}
                    - {type: image_url, image_url: {url: "data:image/png;base64,AAAA"}}
        """,
    )
    assert run.step("look").status == "failed"
    assert "not a readable image" in (run.step("look").error or "")


async def test_embed_a_text_and_a_list(engine: Engine) -> None:
    run = await run_workflow(
        engine,
        """
        steps:
          - step_id: one
            type: model_call
            model_id: tiny-embedder
            operation: embed
            input: "{{ input.texts[0] }}"
          - step_id: many
            type: model_call
            model_id: tiny-embedder
            operation: embed
            input: "{{ input.texts }}"
        output: {one: "{{ steps.one.output }}", many: "{{ steps.many.output }}"}
        """,
        {"texts": ["apples and pears", "a much longer sentence about something else"]},
    )
    assert run.status == "completed", run.result.error
    one, many = run.output["one"], run.output["many"]
    Draft202012Validator(OUTPUT_SCHEMAS["embed"]).validate(one)
    Draft202012Validator(OUTPUT_SCHEMAS["embed"]).validate(many)
    assert len(one) == 32
    assert all(isinstance(x, float) for x in one)
    assert math.isclose(math.sqrt(sum(x * x for x in one)), 1.0, rel_tol=1e-4)
    assert [len(v) for v in many] == [32, 32]
    assert many[0] == pytest.approx(one, abs=1e-4)  # batching does not change a vector
    assert many[1] != pytest.approx(many[0], abs=1e-3)
    direct = await engine.models.embed("tiny-embedder", ["apples and pears"])
    assert one == pytest.approx(direct.vectors[0], abs=1e-6)


async def test_count_tokens(engine: Engine) -> None:
    run = await run_workflow(
        engine,
        """
        steps:
          - step_id: lm
            type: model_call
            model_id: tiny-lm
            operation: count_tokens
            input: "{{ input.text }}"
          - step_id: embedder
            type: model_call
            model_id: tiny-embedder
            operation: count_tokens
            input: "{{ input.text }}"
        """,
        {"text": "counting the tokens of this sentence"},
    )
    assert run.status == "completed", run.result.error
    text = "counting the tokens of this sentence"
    assert run.output["lm"] == {"tokens": await engine.models.count_tokens("tiny-lm", text)}
    embedder = engine.models.get("tiny-embedder").model
    assert run.output["embedder"] == {"tokens": embedder.count_tokens(text)}
    assert run.output["lm"]["tokens"] > 6  # more than one token per word: a real tokenizer
    Draft202012Validator(OUTPUT_SCHEMAS["count_tokens"]).validate(run.output["embedder"])


@pytest.mark.parametrize(
    ("model", "operation", "input", "message"),
    [
        (
            "tiny-lm",
            "embed",
            "'text'",
            "operation 'embed' needs a model of type 'embeddings' or 'echo'; 'tiny-lm' is a "
            "'lm' model",
        ),
        (
            "tiny-embedder",
            "chat",
            "{prompt: hi}",
            "operation 'chat' needs a model of type 'lm' or 'multimodal' or 'echo'; "
            "'tiny-embedder' is a 'embeddings' model",
        ),
        (
            "tiny-lm",
            "vision",
            "{prompt: hi, image_url: 'data:,'}",
            "operation 'vision' needs a model of type 'multimodal'; 'tiny-lm' is a 'lm' model",
        ),
        (
            "tiny-vlm",
            "vision",
            "{prompt: hi}",
            "operation 'vision' needs an image: give input.image_url",
        ),
        ("missing-model", "chat", "{prompt: hi}", "model 'missing-model' not found"),
    ],
)
async def test_errors_fail_the_step_with_a_clear_message(
    engine: Engine, model: str, operation: str, input: str, message: str
) -> None:
    run = await run_workflow(
        engine,
        f"""
        steps:
          - step_id: call
            type: model_call
            model_id: "{{{{ input.model }}}}"
            operation: {operation}
            input: {input}
            retry: {{attempts: 2, backoff_s: 0}}
        """,
        {"model": model},
    )
    assert run.status == "failed"
    record = run.step("call")
    assert record.status == "failed"
    assert message in (record.error or ""), record.error
    assert record.model == model


async def test_a_request_error_is_not_retried(engine: Engine) -> None:
    run = await run_workflow(
        engine,
        """
        steps:
          - step_id: call
            type: model_call
            model_id: "{{ input.model }}"
            operation: embed
            input: text
            retry: {attempts: 3, backoff_s: 0}
        """,
        {"model": "tiny-lm"},
    )
    assert run.step("call").status == "failed"
    assert run.step("call").attempts == 1  # the same request would fail the same way


async def test_rendered_input_with_an_unknown_option_fails_naming_it(engine: Engine) -> None:
    run = await run_workflow(
        engine,
        """
        steps:
          - step_id: call
            type: model_call
            model_id: tiny-lm
            operation: chat
            input: "{{ input.body }}"
        """,
        {"body": {"prompt": "hi", "temprature": 0.2}},
    )
    assert run.step("call").status == "failed"
    assert "'temprature' was unexpected" in (run.step("call").error or "")


@pytest.mark.parametrize(
    ("operation", "input", "message"),
    [
        ("embed", "{prompt: hi}", "operation 'embed' takes a text or a list of texts"),
        ("chat", "hello", "operation 'chat' takes an object as input"),
        ("chat", "{max_tokens: 3}", "operation 'chat' needs input.messages or input.prompt"),
        (
            "chat",
            "{prompt: hi, messages: [{role: user, content: hi}]}",
            "give input.messages or input.prompt, not both",
        ),
        ("count_tokens", "[a, b]", "operation 'count_tokens' takes a text"),
        ("chat", "{prompt: hi, temprature: 1}", "'temprature'"),
    ],
)
async def test_literal_inputs_are_checked_before_running(
    operation: str, input: str, message: str
) -> None:
    with pytest.raises(WorkflowInvalid) as info:
        compile_workflow(
            f"""
            steps:
              - step_id: call
                type: model_call
                model_id: m
                operation: {operation}
                input: {input}
            """
        )
    assert any(message in issue.message for issue in info.value.issues), info.value.issues
    assert all(issue.pointer.startswith("/steps/0/input") for issue in info.value.issues)


async def test_generation_options() -> None:
    params = ChatParams.from_options({"stop": "END", "seed": 3}, param="input")
    assert (params.max_tokens, params.temperature, params.top_p) == (512, 0.7, 1.0)
    assert (params.stop, params.seed) == (["END"], 3)
    with pytest.raises(InvalidRequest) as info:
        ChatParams.from_options({"max_token": 3}, param="generation_config")
    assert info.value.param == "generation_config"
    assert "unknown generation_config key(s): max_token" in info.value.message
    with pytest.raises(InvalidRequest, match="invalid input"):
        ChatParams.from_options({"max_tokens": "many"}, param="input")


async def test_without_the_engines_services_the_step_says_so() -> None:
    """`fusion run` runs workflows without a model registry."""
    result = await Runner().run(
        compile_workflow(
            """
            steps:
              - step_id: embed
                type: model_call
                model_id: m
                operation: embed
                input: hello
            """
        )
    )
    assert result.status == "failed"
    assert result.trace[0].error == (
        "step 'embed' needs the engine's 'models' service, which this runner does not "
        "provide: run the workflow on the server (`fusion serve`)"
    )
