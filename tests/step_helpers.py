"""Run workflows that use the built-in model and RAG step types on a real Engine: real
models loaded through the registry, a real SQLite store, the engine's own Runner."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from engine_helpers import compile_yaml

from engine.config import Settings
from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.compiler import compile_document
from engine.dsl.source import from_object
from engine.runtime.executor import Runner
from engine.runtime.trace import RunResult, StepRecord
from engine.services import Engine
from engine.steps.registry import default_registry

RUN_TIMEOUT_S = 60.0  # a bound, reached only when something hangs


async def start_engine(data_dir: Path, models: Mapping[str, tuple[Path, str]]) -> Engine:
    """An Engine on ``data_dir`` with ``models`` (id -> (path, type)) loaded at start-up."""
    settings = Settings(
        data_dir=data_dir,
        workflows_dir=data_dir / "no-workflows",
        startup_models=[
            {"model_path": str(path), "model_type": kind, "model_id": model_id}
            for model_id, (path, kind) in models.items()
        ],
    )
    return await Engine.start(settings)


def compile_workflow(workflow: str | Mapping[str, Any]) -> CompiledWorkflow:
    """YAML text (dedented) or an already-parsed body (the compose API's JSON)."""
    if isinstance(workflow, str):
        return compile_yaml(workflow, registry=default_registry())
    return compile_document(from_object(workflow), default_registry())


class Run:
    """One finished run and the events it emitted, in order."""

    def __init__(self, result: RunResult, events: list[dict[str, Any]]) -> None:
        self.result = result
        self.events = events

    @property
    def status(self) -> str:
        return self.result.status

    @property
    def output(self) -> Any:
        return self.result.output

    def step(self, step_id: str) -> StepRecord:
        return next(r for r in self.result.trace if r.step_id == step_id)

    def of(self, event: str, step_id: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["event"] == event and (step_id is None or e.get("step_id") == step_id)
        ]


async def run_workflow(
    engine: Engine,
    workflow: str | Mapping[str, Any],
    input: Any = None,
    *,
    models: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Run:
    runner: Runner = engine.runner
    events: list[dict[str, Any]] = []
    result = await asyncio.wait_for(
        runner.run(
            compile_workflow(workflow), input, models=models, config=config, on_event=events.append
        ),
        RUN_TIMEOUT_S,
    )
    return Run(result, events)


def png_data_uri(size: int = 32, colour: tuple[int, int, int] = (200, 30, 30)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest_asyncio.fixture(scope="module", loop_scope="module", name="engine")
async def tiny_models_engine(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_lm_dir: Path,
    tiny_vlm_dir: Path,
    tiny_embedder_dir: Path,
) -> AsyncIterator[Engine]:
    """A running engine per test module with the three tiny models, as `engine`."""
    engine = await start_engine(
        tmp_path_factory.mktemp("steps"),
        {
            "tiny-lm": (tiny_lm_dir, "lm"),
            "tiny-vlm": (tiny_vlm_dir, "multimodal"),
            "tiny-embedder": (tiny_embedder_dir, "embeddings"),
        },
    )
    try:
        yield engine
    finally:
        await engine.stop()
