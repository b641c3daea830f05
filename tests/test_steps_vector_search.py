"""The `vector_search` and `rerank` step types on a real collection (all-MiniLM-L6-v2
embeddings, so similarities mean something), and the spec's compose example (§3.4) run
end to end: embed_query -> retrieve_docs -> generate_answer."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from jsonschema import Draft202012Validator
from spec_examples import COMPOSE_EXAMPLE
from step_helpers import compile_workflow, run_workflow, start_engine

from engine.dsl.issues import WorkflowInvalid
from engine.rag.retrieval import RERANK_INSTRUCTION, RRF_K
from engine.rag.service import Upload
from engine.services import Engine
from engine.steps.rerank import RerankStep
from engine.steps.vector_search import VectorSearchStep

pytestmark = pytest.mark.asyncio(loop_scope="module")

COLLECTION = "docs"
DOCS = {
    "tea": "Green tea is made from unoxidised leaves of the Camellia sinensis plant. Brewing "
    "it with water below boiling keeps it from turning bitter.",
    "volcano": "A volcano erupts when molten rock, called magma, rises through the crust and "
    "escapes as lava, ash and gas.",
    "bicycle": "Keeping a bicycle chain clean and lightly oiled makes shifting smooth and "
    "stops the chain from rusting.",
    "orbit": "The Moon orbits the Earth about once every twenty-seven days, always showing "
    "the same face to us.",
    "router": "To reset the router, hold the recessed button for ten seconds; the lights "
    "blink and the firmware code ZX81Q restores factory settings.",
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(
    tmp_path_factory: pytest.TempPathFactory,
    minilm_dir: Path,
    tiny_lm_dir: Path,
    tiny_embedder_dir: Path,
) -> AsyncIterator[Engine]:
    engine = await start_engine(
        tmp_path_factory.mktemp("vector-search"),
        {
            "embedding-model": (minilm_dir, "embeddings"),
            "qwen-7b": (tiny_lm_dir, "lm"),
            "tiny-embedder": (tiny_embedder_dir, "embeddings"),
        },
    )
    try:
        result = await engine.rag.ingest(
            COLLECTION,
            [Upload(f"{name}.txt", text.encode(), "text/plain") for name, text in DOCS.items()],
            embedding_model="embedding-model",
        )
        assert result.chunks_created == len(DOCS)
        yield engine
    finally:
        await engine.stop()


def search(**params: Any) -> str:
    """A one-step workflow: a vector_search step with these parameters (YAML values)."""
    lines = "".join(f"    {key}: {value}\n" for key, value in params.items())
    return "steps:\n  - step_id: search\n    type: vector_search\n" + lines


def files(hits: list[dict[str, Any]]) -> list[str]:
    return [hit["metadata"]["file"].removesuffix(".txt") for hit in hits]


async def test_search_by_query_text(engine: Engine) -> None:
    run = await run_workflow(
        engine,
        search(collection=COLLECTION, query='"{{ input.q }}"', top_k=2),
        {"q": "How do I restore my wifi box to factory defaults?"},
    )
    assert run.status == "completed", run.result.error
    hits = run.output["search"]
    assert len(hits) == 2
    assert files(hits)[0] == "router"
    assert all(set(hit) == {"chunk_id", "text", "score", "metadata"} for hit in hits)
    Draft202012Validator(VectorSearchStep.output_schema).validate(hits)  # what the compiler types
    scores = [hit["score"] for hit in hits]
    assert scores == sorted(scores, reverse=True)
    assert hits[0]["text"] == DOCS["router"]
    assert hits[0]["metadata"]["document_id"] in hits[0]["chunk_id"]
    assert run.step("search").model is None  # the collection's own model was used


async def test_search_by_embedding_matches_search_by_text(engine: Engine) -> None:
    workflow = """
        steps:
          - step_id: embed
            type: model_call
            model_id: embedding-model
            operation: embed
            input: "{{ input.q }}"
          - step_id: by_vector
            type: vector_search
            collection: docs
            query_embedding: "{{ steps.embed.output }}"
            top_k: 4
          - step_id: by_text
            type: vector_search
            collection: docs
            query: "{{ input.q }}"
            model_id: embedding-model
            top_k: 4
    """
    run = await run_workflow(engine, workflow, {"q": "Why does lava come out of mountains?"})
    assert run.status == "completed", run.result.error
    by_vector, by_text = run.output["by_vector"], run.output["by_text"]
    assert files(by_vector)[0] == "volcano"
    assert [h["chunk_id"] for h in by_vector] == [h["chunk_id"] for h in by_text]
    assert [h["score"] for h in by_vector] == pytest.approx([h["score"] for h in by_text])
    assert run.step("by_text").model == "embedding-model"


async def test_spec_compose_example_runs_end_to_end(engine: Engine) -> None:
    body = copy.deepcopy(COMPOSE_EXAMPLE)
    run = await run_workflow(
        engine, body, {"query": "How often does the moon go round us?", "collection": COLLECTION}
    )
    assert body == COMPOSE_EXAMPLE
    assert run.status == "completed", run.result.error
    assert [(r.step_id, r.status, r.model) for r in run.result.trace] == [
        ("embed_query", "completed", "embedding-model"),
        ("retrieve_docs", "completed", None),
        ("generate_answer", "completed", "qwen-7b"),
    ]
    answer = run.output["generate_answer"]  # the only sink
    assert isinstance(answer["content"], str)
    assert answer["usage"]["completion_tokens"] >= 1
    # The retrieved context went into the prompt: far longer than the bare question.
    assert answer["usage"]["prompt_tokens"] > 200
    tokens = run.of("token", "generate_answer")
    assert "".join(e["delta"] for e in tokens) == answer["content"]


async def test_similarity_threshold_filters_hits(engine: Engine) -> None:
    question = "How do I look after the chain of my bike?"
    everything = await run_workflow(
        engine,
        search(collection=COLLECTION, query=f'"{question}"', top_k=10, similarity_threshold=-1),
    )
    default = await run_workflow(
        engine, search(collection=COLLECTION, query=f'"{question}"', top_k=10)
    )
    strict = await run_workflow(
        engine,
        search(collection=COLLECTION, query=f'"{question}"', top_k=10, similarity_threshold=0.3),
    )
    all_hits = everything.output["search"]
    assert len(all_hits) == len(DOCS)
    assert default.output["search"] == [h for h in all_hits if h["score"] >= 0.0]
    strict_hits = strict.output["search"]
    assert files(strict_hits) == ["bicycle"]
    assert strict_hits == [h for h in all_hits if h["score"] >= 0.3]


async def test_hybrid_fuses_lexical_matches(engine: Engine) -> None:
    # "twenty seven days" and "water" match the orbit and tea passages word for word; by
    # meaning alone the volcano passage comes second.
    query = '"twenty seven days water"'
    vector_only = await run_workflow(
        engine, search(collection=COLLECTION, query=query, top_k=5, similarity_threshold=-1)
    )
    hybrid = await run_workflow(
        engine,
        search(collection=COLLECTION, query=query, top_k=5, similarity_threshold=-1, hybrid="true"),
    )
    assert hybrid.status == "completed", hybrid.result.error
    assert files(vector_only.output["search"])[:3] == ["orbit", "volcano", "tea"]
    hits = hybrid.output["search"]
    assert files(hits)[:3] == ["orbit", "tea", "volcano"]
    # rerank_score is the reciprocal rank fusion: sum of 1 / (60 + rank) over both lists.
    assert hits[0]["rerank_score"] == pytest.approx(2 / (RRF_K + 1), abs=1e-6)  # 1st, 1st
    assert hits[1]["rerank_score"] == pytest.approx(1 / (RRF_K + 3) + 1 / (RRF_K + 2), abs=1e-6)
    fused = [h["rerank_score"] for h in hits]
    assert fused == sorted(fused, reverse=True)
    assert hits[0]["score"] == pytest.approx(vector_only.output["search"][0]["score"])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"query_embedding": '"{{ [0.5] * 32 }}"'},
            "the query vector has 32 dimensions; collection 'docs' holds 384-dimensional",
        ),
        ({"query": "tea", "model_id": "tiny-embedder"}, "was embedded with 'embedding-model'"),
        ({"query": "tea", "model_id": "qwen-7b"}, "which does not embed"),
        ({"query": '"{{ input.q }}"', "collection": "nope"}, "collection 'nope' not found"),
    ],
)
async def test_errors_fail_the_step(engine: Engine, params: dict[str, Any], message: str) -> None:
    run = await run_workflow(engine, search(**{"collection": COLLECTION, **params}), {"q": "x"})
    assert run.step("search").status == "failed"
    assert message in (run.step("search").error or ""), run.step("search").error


@pytest.mark.parametrize(
    ("params", "pointer", "message"),
    [
        ({}, "/steps/0", "give exactly one of 'query' (text) and 'query_embedding'"),
        ({"query": "a", "query_embedding": "[1.0]"}, "/steps/0/query_embedding", "not both"),
        ({"query_embedding": "[1.0]", "hybrid": "true"}, "/steps/0/hybrid", "needs 'query'"),
        ({"query": "a", "similarity_threshold": 2}, "/steps/0/similarity_threshold", "maximum"),
    ],
)
async def test_static_checks(params: dict[str, Any], pointer: str, message: str) -> None:
    with pytest.raises(WorkflowInvalid) as info:
        compile_workflow(search(collection=COLLECTION, **params))
    issues = [(i.pointer, i.message) for i in info.value.issues]
    assert any(p == pointer and message in m for p, m in issues), issues


async def test_rerank_orders_by_the_models_relevance_and_cuts(engine: Engine) -> None:
    question = "What should I know about tea?"
    run = await run_workflow(
        engine,
        """
        steps:
          - step_id: retrieve
            type: vector_search
            collection: docs
            query: "{{ input.q }}"
            top_k: 5
            similarity_threshold: -1
          - step_id: rerank
            type: rerank
            query: "{{ input.q }}"
            documents: "{{ steps.retrieve.output }}"
            model_id: qwen-7b
            top_k: 3
          - step_id: strings
            type: rerank
            query: "{{ input.q }}"
            documents: "{{ steps.retrieve.output | map(attribute='text') | list }}"
            model_id: qwen-7b
            instruction: Judge whether the passage is about drinks
        output:
          retrieved: "{{ steps.retrieve.output }}"
          reranked: "{{ steps.rerank.output }}"
          strings: "{{ steps.strings.output }}"
        """,
        {"q": question},
    )
    assert run.status == "completed", run.result.error
    retrieved, reranked = run.output["retrieved"], run.output["reranked"]
    texts = [h["text"] for h in retrieved]
    scores = await engine.models.relevance("qwen-7b", question, texts, RERANK_INSTRUCTION)
    expected = sorted(range(len(texts)), key=lambda i: -scores[i])[:3]
    assert [h["chunk_id"] for h in reranked] == [retrieved[i]["chunk_id"] for i in expected]
    assert [h["rerank_score"] for h in reranked] == pytest.approx([scores[i] for i in expected])
    for hit in reranked:  # the hit keeps everything it had
        original = next(h for h in retrieved if h["chunk_id"] == hit["chunk_id"])
        assert {k: v for k, v in hit.items() if k != "rerank_score"} == original
    assert run.step("rerank").model == "qwen-7b"
    Draft202012Validator(RerankStep.output_schema).validate(reranked)

    strings = run.output["strings"]
    assert len(strings) == len(texts)  # no top_k: all of them
    assert all(set(s) == {"text", "rerank_score"} for s in strings)
    Draft202012Validator(RerankStep.output_schema).validate(strings)
    own = await engine.models.relevance(
        "qwen-7b", question, texts, "Judge whether the passage is about drinks"
    )
    assert [s["text"] for s in strings] == [
        texts[i] for i in sorted(range(len(texts)), key=lambda i: -own[i])
    ]


async def test_rerank_needs_a_language_model(engine: Engine) -> None:
    run = await run_workflow(
        engine,
        """
        steps:
          - step_id: rerank
            type: rerank
            query: q
            documents: [a, b]
            model_id: "{{ input.model }}"
        """,
        {"model": "embedding-model"},
    )
    assert run.step("rerank").status == "failed"
    assert "rerank needs a model of type 'lm'; 'embedding-model' is a 'embeddings' model" in (
        run.step("rerank").error or ""
    )


async def test_rerank_of_nothing_is_nothing(engine: Engine) -> None:
    run = await run_workflow(
        engine,
        """
        steps:
          - step_id: rerank
            type: rerank
            query: q
            documents: "{{ input.none }}"
            model_id: qwen-7b
        """,
        {"none": []},
    )
    assert run.status == "completed", run.result.error
    assert run.output == {"rerank": []}


async def test_rerank_documents_need_text(engine: Engine) -> None:
    run = await run_workflow(
        engine,
        """
        steps:
          - step_id: rerank
            type: rerank
            query: q
            documents: "{{ input.docs }}"
            model_id: qwen-7b
        """,
        {"docs": [{"text": "fine"}, {"chunk_id": "no text"}]},
    )
    assert run.step("rerank").status == "failed"
    assert "parameter documents[1]: 'text' is a required property" in (
        run.step("rerank").error or ""
    )
