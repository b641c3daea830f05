"""Model types are one enum, each with one registered backend; the tables of types that
the DSL, the capabilities endpoint, model_call and the model views use derive from the
backends' declarations and keep the values the API has always had."""

from __future__ import annotations

from engine.config import Settings
from engine.dsl.schema import MODEL_ROLE
from engine.fusion.capabilities import CAPABILITIES
from engine.models.backends import (
    BACKENDS,
    default_backends,
    serving,
    type_capabilities,
    type_tag,
)
from engine.models.backends.textgen import GenerativeBackend
from engine.models.types import ModelType, Operation
from engine.steps.model_call import MODEL_TYPES, ModelCallStep


def test_every_model_type_has_one_backend_registered_in_enum_order() -> None:
    assert [backend.model_type for backend in BACKENDS] == list(ModelType)
    assert [t.value for t in ModelType] == [
        "lm",
        "multimodal",
        "embeddings",
        "whisper",
        "image-generation",
        "image-edit",
        "echo",
    ]


def test_every_declared_capability_is_one_the_endpoint_lists() -> None:
    for backend in BACKENDS:
        assert backend.capabilities, backend
        assert set(backend.capabilities) <= set(CAPABILITIES), backend


def test_default_backends_are_built_from_the_settings() -> None:
    backends = default_backends(Settings(model_prefill_step_tokens=7))
    assert list(backends) == list(ModelType)
    for generative in (backends["lm"], backends["multimodal"]):
        assert isinstance(generative, GenerativeBackend)
        assert generative.prefill_step_tokens == 7
    assert not backends["image-generation"].available()
    assert not backends["image-edit"].available()


def test_model_call_operations_are_served_by_the_declared_types() -> None:
    assert MODEL_TYPES == {
        "chat": ("lm", "multimodal", "echo"),
        "vision": ("multimodal",),
        "embed": ("embeddings", "echo"),
        "count_tokens": ("lm", "multimodal", "embeddings", "echo"),
    }
    operation = ModelCallStep.params_schema["properties"]["operation"]
    assert operation == {"enum": ["chat", "vision", "embed", "count_tokens"]}
    assert serving(Operation.TRANSCRIBE) == ("whisper",)
    assert serving(Operation.RELEVANCE) == ("lm",)  # reranking
    assert serving(Operation.TOKENIZE) == ("lm", "multimodal", "embeddings", "echo")  # chunking


def test_capabilities_and_tags_by_type() -> None:
    by_type = {t.value: sorted(type_capabilities(t)) for t in ModelType}
    assert by_type == {
        "lm": ["chat"],
        "multimodal": ["chat", "vision"],
        "embeddings": ["embeddings"],
        "whisper": ["transcription"],
        "image-generation": ["image_generation"],
        "image-edit": ["image_edit"],
        "echo": ["chat", "embeddings"],
    }
    assert {t.value: type_tag(t) for t in ModelType} == {
        "lm": "chat",
        "multimodal": "vision",
        "embeddings": "embeddings",
        "whisper": "transcription",
        "image-generation": "image-generation",
        "image-edit": "image-edit",
        "echo": "chat",
    }


def test_the_dsl_model_role_lists_every_type() -> None:
    assert MODEL_ROLE["properties"]["type"] == {"enum": [t.value for t in ModelType]}
