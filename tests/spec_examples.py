"""Request bodies printed in ../shared/spec/phase4-api.md, verbatim, for the tests that
check the spec's examples work as-is."""

from __future__ import annotations

from typing import Any

# §3.4 Compose Custom Workflow: the example request body.
COMPOSE_EXAMPLE: dict[str, Any] = {
    "name": "custom_rag_workflow",
    "description": "Custom RAG workflow with specific models",
    "steps": [
        {
            "step_id": "embed_query",
            "type": "model_call",
            "model_id": "embedding-model",
            "operation": "embed",
            "input": "{{ input.query }}",
        },
        {
            "step_id": "retrieve_docs",
            "type": "vector_search",
            "collection": "{{ input.collection }}",
            "query_embedding": "{{ steps.embed_query.output }}",
            "top_k": 5,
        },
        {
            "step_id": "generate_answer",
            "type": "model_call",
            "model_id": "qwen-7b",
            "operation": "chat",
            "input": {
                "messages": [
                    {
                        "role": "system",
                        "content": "Answer based on the following context: "
                        "{{ steps.retrieve_docs.output }}",
                    },
                    {"role": "user", "content": "{{ input.query }}"},
                ]
            },
        },
    ],
}
