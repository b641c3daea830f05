"""The engine's long-lived services, built from Settings and started/stopped together
(the server's lifespan, or a CLI command, owns one Engine)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from engine.config import Settings
from engine.dsl.catalog import WorkflowCatalog
from engine.dsl.source import configure as configure_documents
from engine.fusion.runs import RunStore
from engine.fusion.service import FusionService
from engine.models.backends import default_backends
from engine.models.images import ImagePolicy
from engine.models.memory import GIB, default_budget_bytes
from engine.models.registry import ModelRegistry
from engine.models.types import LoadSpec, ModelLimits
from engine.rag.service import IngestLimits, RagService
from engine.runtime.executor import RunLimits, Runner
from engine.sandbox import SandboxLimits, configure_shared_sandbox
from engine.steps.base import StepServices
from engine.steps.registry import StepRegistry, default_registry
from engine.store import Store

log = structlog.get_logger(__name__)


@dataclass
class Engine:
    settings: Settings
    store: Store
    steps: StepRegistry
    catalog: WorkflowCatalog
    models: ModelRegistry
    runner: Runner
    rag: RagService
    fusion: FusionService | None = None  # set by start(), once the catalog is loaded

    @classmethod
    async def start(cls, settings: Settings, *, load_workflows: bool = True) -> Engine:
        """Open the store, load the workflows (unless `load_workflows` is false: a command
        that runs none, such as `fusion ingest`, must not fail on a broken one) and the
        start-up models."""
        configure_documents(settings)  # workflow document limits, for every loader
        configure_shared_sandbox(SandboxLimits(workers=settings.sandbox_workers)).warm()
        store = Store(settings.db_path)
        steps = default_registry()
        catalog = WorkflowCatalog(steps)
        if load_workflows and settings.workflows_dir.is_dir():
            catalog.load_directory(settings.workflows_dir)
        budget = (
            int(settings.model_memory_budget_gb * GIB)
            if settings.model_memory_budget_gb
            else default_budget_bytes()
        )
        models = ModelRegistry(
            default_backends(settings),
            budget_bytes=budget,
            default_concurrency=settings.model_max_concurrency,
            default_queue=settings.model_max_queue,
            images=ImagePolicy.from_settings(settings),
            limits=ModelLimits.from_settings(settings),
        )
        rag = RagService(store, models, IngestLimits.from_settings(settings))
        runner = Runner(
            catalog=catalog,
            services=StepServices(models=models, rag=rag),
            select_model=lambda role, spec: models.select(spec.type),
            max_parallel=settings.max_parallel_steps,
            max_depth=settings.max_workflow_depth,
            limits=RunLimits.from_settings(settings),
        )
        engine = cls(settings, store, steps, catalog, models, runner, rag)
        # Composed workflows join the catalog here, after the predefined files.
        runs = RunStore(
            store,
            max_runs=settings.runs_max_stored,
            max_run_bytes=settings.runs_max_stored_bytes,
        )
        engine.fusion = FusionService(store, steps, catalog, models, runner, runs)
        await engine.load_startup_models()
        return engine

    async def load_startup_models(self) -> None:
        specs = self.settings.startup_models
        if specs is None:
            specs = demo_models(self.settings.data_dir / "models")
        for body in specs:
            entry = await self.models.load(LoadSpec(**body))
            log.info("startup_model_loaded", model_id=entry.id, type=entry.type)

    async def stop(self) -> None:
        await self.models.close()
        self.store.close()


def demo_models(models_dir: Path) -> list[dict[str, Any]]:
    """The default setup: the real MiniLM embedder when its package is installed, and a
    tiny random-weight chat model so every endpoint answers offline. The chat model is
    tagged so nobody mistakes its output for language."""
    from engine.models.synthetic import build_lm

    embedder = demo_embedder()
    specs: list[dict[str, Any]] = [] if embedder is None else [embedder]
    chat = build_lm(models_dir / "demo-chat")
    specs.append(
        {
            "model_path": str(chat),
            "model_type": "lm",
            "model_id": "demo-chat",
            "metadata": {"tags": ["demo", "random-weights"]},
        }
    )
    return specs


def demo_embedder() -> dict[str, Any] | None:
    """The demo setup's embedder (the real MiniLM) as a load body, if its package is
    installed; `fusion ingest` uses it so its collections match the server's default."""
    from engine.models.minilm import minilm_path

    minilm = minilm_path()
    if minilm is None:
        return None
    return {"model_path": str(minilm), "model_type": "embeddings", "model_id": "all-minilm-l6-v2"}
