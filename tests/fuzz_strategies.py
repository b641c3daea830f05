"""Hypothesis strategies shared by the fuzz suites: workflow-shaped documents built from the
DSL's own keys, step types and template shapes, each value sometimes replaced by any JSON."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from engine.steps.registry import default_registry

# Deterministic (derandomized, no example database, so every run tries the same examples)
# and bounded, so the suites run in `make test`.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

STEP_IDS = ["a", "b", "fetch", "answer", "a b", "", "_x", "steps", "input"]
TEMPLATES = [
    "{{ input.query }}",
    "{{ steps.a.output }}",
    "{{ steps.b.output.text }}",
    "{{ steps.fetch.ran }}",
    "{{ item }}",
    "{{ index }}",
    "{{ config.top_k * 2 }}",
    "{{ models.gen }}",
    "{{ input.xs }}",
    "{{ input.xs | join(',') }}",
    "{{ steps[input.x].output }}",
    "{{ ().__class__ }}",
    "{% if input.x %}y{% endif %}",
    "{{ unclosed",
    "{% for x in input.xs %}{{ x }}{% endfor %}",
    "text {{ input.x }} text",
]
leaves = (
    st.sampled_from(STEP_IDS)
    | st.sampled_from(TEMPLATES)
    | st.none()
    | st.booleans()
    | st.integers(-5, 10)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(STEP_IDS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
STEP_TYPES = [*default_registry().names(), "templat", "", "Template"]
STEP_KEYS = {
    "step_id": st.sampled_from(STEP_IDS) | values,
    "type": st.sampled_from(STEP_TYPES) | values,
    "description": st.text(max_size=10) | values,
    "depends_on": st.lists(st.sampled_from(STEP_IDS), max_size=3) | values,
    "when": st.sampled_from(TEMPLATES) | values,
    "for_each": st.sampled_from(TEMPLATES) | values,
    "concurrency": st.integers(-1, 5) | values,
    "repeat": st.fixed_dictionaries(
        {}, optional={"max": st.integers(-1, 5) | values, "until": st.sampled_from(TEMPLATES)}
    )
    | values,
    "retry": st.fixed_dictionaries(
        {},
        optional={"attempts": st.integers(-1, 5), "backoff_s": values, "max_backoff_s": values},
    )
    | values,
    "timeout_s": st.floats() | values,
    "on_error": st.sampled_from(["fail", "continue", "retry"]) | values,
    "default": values,
    "value": values,
    "workflow": st.sampled_from(["child_echo", "unknown"]) | values,
    "input": values,
    "text": values,
    "query": values,
    "collection": values,
    "top_k": values,
    "documents": values,
    "chunk_size": values,
    "overlap": values,
    "model_id": values,
    "instruction": values,
    "operation": values,
    "hybrid": values,
    "similarity_threshold": values,
    "query_embedding": values,
    "models": values,
    "config": values,
    "colour": values,
}
steps = st.fixed_dictionaries(
    {"step_id": st.sampled_from(STEP_IDS), "type": st.sampled_from(STEP_TYPES)},
    optional={k: v for k, v in STEP_KEYS.items() if k not in ("step_id", "type")},
) | st.fixed_dictionaries({}, optional=STEP_KEYS)
schemas = st.recursive(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["object", "string", "integer", "array", "strng"]) | values,
            "minLength": st.integers(-1, 3) | values,
            "pattern": st.sampled_from(["^a+$", "(", "[a-z]", "\\d{2,}"]) | values,
            "default": values,
            "enum": st.lists(values, max_size=3) | values,
            "$ref": st.sampled_from(["#/definitions/x", "#", "other.json", "#/nope"]),
            "format": st.sampled_from(["email", "uri", "date-time", "nope"]),
        },
    ),
    lambda inner: st.fixed_dictionaries(
        {},
        optional={
            "type": st.just("object"),
            "properties": st.dictionaries(st.text(max_size=5), inner, max_size=3),
            "items": inner,
            "required": st.lists(st.text(max_size=5), max_size=3) | values,
            "definitions": st.dictionaries(st.just("x"), inner, max_size=1),
        },
    ),
    max_leaves=6,
)
workflows = st.fixed_dictionaries(
    {"steps": st.lists(steps | values, max_size=4) | values},
    optional={
        "id": st.sampled_from(["fuzz", "child_echo", "has spaces"]) | values,
        "name": values,
        "description": values,
        "version": st.integers(0, 3) | values,
        "models": st.dictionaries(
            st.sampled_from(["gen", "rerank", "2nd"]),
            st.fixed_dictionaries(
                {}, optional={"type": st.sampled_from(["lm", "embeddings", "llm"])}
            )
            | values,
            max_size=2,
        )
        | values,
        "input_schema": schemas | values,
        "config": values,
        "output": values,
        "inputs": values,
    },
)
