"""The three predefined workflows (workflows/*.yaml), end to end over HTTP: a real server
loading the repository's workflow files, real tiny models, documents ingested through the
RAG API, runs through POST /api/fusion/orchestrate."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from serverutil import serve_app

from engine.config import Settings
from server.app import create_app

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_lm_dir: Path,
    tiny_vlm_dir: Path,
    minilm_dir: Path,
) -> Iterator[httpx.Client]:
    models = [
        {"model_path": str(minilm_dir), "model_type": "embeddings", "model_id": "minilm"},
        {"model_path": str(tiny_lm_dir), "model_type": "lm", "model_id": "tiny-lm"},
        {"model_path": str(tiny_vlm_dir), "model_type": "multimodal", "model_id": "tiny-vlm"},
    ]
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("data"),
        workflows_dir=WORKFLOWS,
        startup_models=models,
        log_level="warning",
    )
    with (
        serve_app(create_app(settings)) as server,
        httpx.Client(base_url=server.base_url, timeout=120) as http,
    ):
        files = [
            (
                "files",
                (
                    "mlx.md",
                    b"# MLX\n\nMLX is an array framework for machine learning "
                    b"on Apple silicon. Arrays live in unified memory.",
                    "text/markdown",
                ),
            ),
            (
                "files",
                (
                    "bread.txt",
                    b"Sourdough bread rises because wild yeast and lactic "
                    b"bacteria ferment the dough.",
                    "text/plain",
                ),
            ),
        ]
        ingested = http.post("/api/rag/ingest", data={"collection": "docs"}, files=files)
        assert ingested.status_code == 200, ingested.text
        yield http


def orchestrate(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/api/fusion/orchestrate", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def steps(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["step"]: entry for entry in run["execution_trace"]}


def test_the_predefined_workflows_are_listed_as_the_spec_shows(client: httpx.Client) -> None:
    listed = {w["id"]: w for w in client.get("/api/fusion/workflows").json()["workflows"]}
    assert listed["rag_with_rerank"]["required_models"] == ["embeddings", "lm"]
    assert listed["rag_with_rerank"]["optional_models"] == ["rerank"]
    assert listed["rag_with_rerank"]["input_schema"]["required"] == ["query"]
    assert listed["multimodal_analysis"]["required_models"] == ["multimodal"]
    assert listed["multimodal_analysis"]["input_schema"]["required"] == ["image_url", "prompt"]
    assert listed["sequential_summarization"]["required_models"] == ["lm"]
    assert listed["sequential_summarization"]["optional_models"] == []


def test_rag_with_rerank_without_a_reranker(client: httpx.Client) -> None:
    run = orchestrate(
        client,
        workflow="rag_with_rerank",
        input={"query": "Where do MLX arrays live?", "collection": "docs"},
        config={"max_tokens": 8, "top_k": 1},
    )
    assert run["status"] == "completed"
    trace = steps(run)
    assert trace["retrieve"]["model"] == "minilm"
    assert trace["rerank"]["status"] == "skipped"  # the optional role was not given
    assert trace["generate_answer"]["model"] == "tiny-lm"
    [source] = run["result"]["sources"]
    assert source["chunk_id"].endswith("_chunk_0")
    assert "unified memory" in source["text"]  # the right document, by real semantics
    assert -1.0 <= source["score"] <= 1.0
    assert isinstance(run["result"]["answer"], str)


def test_rag_with_rerank_with_a_reranker(client: httpx.Client) -> None:
    run = orchestrate(
        client,
        workflow="rag_with_rerank",
        input={"query": "How does sourdough rise?", "collection": "docs"},
        models={"rerank": "tiny-lm"},
        config={"max_tokens": 8, "top_k": 2, "similarity_threshold": -1.0},
    )
    assert run["status"] == "completed"
    assert steps(run)["rerank"]["status"] == "completed"
    sources = run["result"]["sources"]
    assert len(sources) == 2
    scores = [s["rerank_score"] for s in sources]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_rag_with_rerank_on_an_unknown_collection_fails_the_run(client: httpx.Client) -> None:
    run = orchestrate(
        client, workflow="rag_with_rerank", input={"query": "x", "collection": "nope"}
    )
    assert run["status"] == "failed"
    assert "collection 'nope' not found" in steps(run)["retrieve"]["error"]


def png_data_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (30, 120, 200)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_multimodal_analysis(client: httpx.Client) -> None:
    run = orchestrate(
        client,
        workflow="multimodal_analysis",
        input={"image_url": png_data_uri(), "prompt": "What colour is this?"},
        config={"max_tokens": 6},
    )
    assert run["status"] == "completed"
    assert steps(run)["analyze"]["model"] == "tiny-vlm"
    usage = run["result"]["usage"]
    assert 0 < usage["completion_tokens"] <= 6
    assert usage["prompt_tokens"] > 10  # the image's tokens are in the prompt


def test_multimodal_analysis_refuses_a_loopback_url(client: httpx.Client) -> None:
    run = orchestrate(
        client,
        workflow="multimodal_analysis",
        input={"image_url": "http://127.0.0.1:9/cat.png", "prompt": "Describe"},
    )
    assert run["status"] == "failed"
    assert "private, loopback or reserved" in steps(run)["analyze"]["error"]


def test_sequential_summarization_runs_passes_until_short_enough(client: httpx.Client) -> None:
    document = " ".join(
        f"Section {i} records that the harbour handled {i * 7} ships in spring." for i in range(60)
    )
    limit = 24
    run = orchestrate(
        client,
        workflow="sequential_summarization",
        input={"document": document, "max_summary_length": limit},
        config={"piece_tokens": 128},
    )
    assert run["status"] == "completed"
    result = run["result"]
    passes = steps(run)["passes"]
    assert passes["status"] == "completed"
    assert result["passes"] >= 1
    # stopped because the summary fits, or because the bounded passes ran out
    assert result["summary_tokens"] <= limit or result["passes"] == 5
    assert isinstance(result["summary"], str)


def test_inputs_are_checked_against_each_schema(client: httpx.Client) -> None:
    for workflow, body, pointer in [
        ("rag_with_rerank", {}, "input/query"),
        ("multimodal_analysis", {"prompt": "x"}, "input/image_url"),
        ("sequential_summarization", {"document": "x", "max_summary_length": 3}, None),
    ]:
        response = client.post(
            "/api/fusion/orchestrate", json={"workflow": workflow, "input": body}
        )
        assert response.status_code == 400, (workflow, response.text)
        error = response.json()["error"]
        if pointer:
            assert error["param"] == pointer
        else:
            assert error["param"].startswith("input/max_summary_length")


# -- one role name: `generation` --------------------------------------------------------------


def test_every_predefined_workflow_names_its_main_model_generation(client: httpx.Client) -> None:
    for workflow in ("rag_with_rerank", "multimodal_analysis", "sequential_summarization"):
        roles = client.get(f"/api/fusion/workflows/{workflow}").json()["models"]
        assert "generation" in roles, workflow


def _describe_image(client: httpx.Client, role: str) -> httpx.Response:
    """multimodal_analysis with tiny-vlm bound to `role`."""
    return client.post(
        "/api/fusion/orchestrate",
        json={
            "workflow": "multimodal_analysis",
            "input": {"image_url": png_data_uri(), "prompt": "What colour is this?"},
            "models": {role: "tiny-vlm"},
            "config": {"max_tokens": 2},
        },
    )


def test_the_new_role_name_runs_without_a_warning(client: httpx.Client) -> None:
    response = _describe_image(client, "generation")
    assert response.status_code == 200, response.text
    assert "warnings" not in response.json()
    assert "X-API-Deprecated" not in response.headers


def test_an_old_role_name_is_mapped_with_a_deprecation_warning(client: httpx.Client) -> None:
    response = _describe_image(client, "vision")
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["status"] == "completed"
    assert run["models"] == {"generation": "tiny-vlm"}
    [warning] = run["warnings"]
    assert warning["code"] == "deprecated_role"
    assert warning["param"] == "models.vision"
    assert "now named 'generation'" in warning["message"]
    # spec §9's deprecation headers
    assert response.headers["X-API-Deprecated"] == "true"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", response.headers["X-API-Sunset"])
    # The warning is about the request: the stored run does not carry it.
    stored = client.get(f"/api/fusion/runs/{run['workflow_id']}").json()
    assert "warnings" not in stored
    assert stored["models"] == {"generation": "tiny-vlm"}


def test_an_old_role_name_in_a_stream_warns_in_the_result_and_the_headers(
    client: httpx.Client,
) -> None:
    with client.stream(
        "POST",
        "/api/fusion/orchestrate",
        json={
            "workflow": "sequential_summarization",
            "input": {"document": "The harbour handled ships.", "max_summary_length": 16},
            "models": {"summarizer": "tiny-lm"},
            "stream": True,
        },
    ) as response:
        assert response.status_code == 200
        assert response.headers["X-API-Deprecated"] == "true"
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    result = json.loads(lines[-1][len("data: ") :])
    assert result["status"] == "completed", result
    assert result["models"] == {"generation": "tiny-lm"}
    assert [w["param"] for w in result["warnings"]] == ["models.summarizer"]


def test_an_old_and_a_new_role_name_together_are_refused(client: httpx.Client) -> None:
    response = client.post(
        "/api/fusion/orchestrate",
        json={
            "workflow": "sequential_summarization",
            "input": {"document": "x"},
            "models": {"summarizer": "tiny-lm", "generation": "tiny-lm"},
        },
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "models.summarizer"
    assert "old name of role 'generation'" in error["message"]


def test_an_old_role_name_is_only_mapped_for_predefined_workflows(client: httpx.Client) -> None:
    definition = {
        "models": {"generation": {"type": "lm"}},
        "steps": [{"step_id": "s", "type": "template", "value": "{{ models.generation }}"}],
    }
    response = client.post(
        "/api/fusion/orchestrate",
        json={"workflow": "custom", "definition": definition, "models": {"summarizer": "x"}},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "models.summarizer"
