"""The engine's long-lived services, built from Settings and started/stopped together
(the server's lifespan, or a CLI command, owns one Engine)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from engine.config import Settings
from engine.dsl.catalog import WorkflowCatalog
from engine.dsl.source import configure as configure_documents
from engine.fusion.reload import WorkflowReloader
from engine.fusion.run_history import RunHistory, RunPurger
from engine.fusion.runs import RunStore
from engine.fusion.service import FusionService, RunOutcome
from engine.jobs.queue import SqliteJobQueue
from engine.jobs.service import JobService
from engine.jobs.webhooks import Deliverer, DeliveryPolicy, WebhookStore
from engine.models.backends import default_backends
from engine.models.images import ImagePolicy
from engine.models.memory import GIB, default_budget_bytes
from engine.models.registry import ModelRegistry
from engine.models.types import BatchPolicy, LoadSpec, ModelLimits
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
    jobs: JobService | None = None  # the job queue's workers (spec §5), when started
    webhooks: WebhookStore | None = None
    deliverer: Deliverer | None = None
    reloader: WorkflowReloader | None = None  # follows workflows_dir, when workflows load
    run_purger: RunPurger | None = None  # deletes runs older than runs_max_age_days
    # Epoch seconds when start() began: /internal/diagnostics' uptime.
    started_at: float = field(default_factory=time.time)

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        load_workflows: bool = True,
        run_body: Callable[[RunOutcome], Any] | None = None,
    ) -> Engine:
        """Open the store, load the workflows (unless `load_workflows` is false: a command
        that runs none, such as `fusion ingest`, must not fail on a broken one) and the
        start-up models. With `run_body` (the §3.1 body of a run, which a workflow job's
        result is) and `jobs_enabled`, start the job queue's workers and webhook
        deliveries too."""
        configure_documents(settings)  # workflow document limits, for every loader
        configure_shared_sandbox(SandboxLimits(workers=settings.sandbox_workers)).warm()
        store = Store(settings.db_path)
        steps = default_registry()
        catalog = WorkflowCatalog(steps)
        reloader = None
        if load_workflows:
            reloader = WorkflowReloader(
                catalog, settings.workflows_dir, settings.workflows_reload_interval_s
            )
            reloader.load()
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
            batching=BatchPolicy.from_settings(settings),
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
            max_field_bytes=settings.runs_max_field_bytes,
        )
        engine.fusion = FusionService(
            store,
            steps,
            catalog,
            models,
            runner,
            runs,
            update_interval_s=settings.runs_update_interval_s,
            max_events=settings.run_events_max,
        )
        if load_workflows:
            # An engine that runs workflows (the server's) owns the runs table: runs a
            # stopped server left `running` are marked failed. A command that runs none
            # (`fusion ingest`) must not touch the rows of a server running beside it.
            await engine.fusion.recover()
        engine.run_purger = RunPurger(
            RunHistory(store),
            max_age_days=settings.runs_max_age_days,
            interval_s=settings.runs_purge_interval_s,
        )
        await engine.load_startup_models()
        if run_body is not None and settings.jobs_enabled:
            await engine.start_jobs(run_body)
        # Last: the composed workflows, which a reload must leave alone, are in the catalog.
        if reloader is not None:
            engine.reloader = reloader
            reloader.start()
        engine.run_purger.start()  # once now, then every runs_purge_interval_s
        return engine

    async def start_jobs(self, run_body: Callable[[RunOutcome], Any]) -> None:
        """The job queue with its workers, and the webhook outbox with its deliverer: a
        job's status change and the deliveries it causes are committed together."""
        assert self.fusion is not None
        settings = self.settings
        queue = SqliteJobQueue.from_settings(self.store, settings)
        self.webhooks = WebhookStore(
            self.store,
            metadata_max_bytes=settings.jobs_metadata_max_bytes,
            max_webhooks=settings.webhook_max_count,
        )
        self.deliverer = Deliverer(self.webhooks, DeliveryPolicy.from_settings(settings))
        deliverer = self.deliverer
        queue.on_event(record=self.webhooks.record, observe=lambda _: deliverer.wake())
        queue.on_purge(self.webhooks.purge)
        self.jobs = JobService(queue, self.models, self.fusion, settings, run_body)
        await self.deliverer.start()
        await self.jobs.start()

    async def load_startup_models(self) -> None:
        specs = self.settings.startup_models
        if specs is None:
            specs = demo_models(self.settings.data_dir / "models")
        for body in specs:
            entry = await self.models.load(LoadSpec(**body))
            log.info("startup_model_loaded", model_id=entry.id, type=entry.type)

    async def stop(self) -> None:
        if self.run_purger is not None:
            await self.run_purger.stop()
        if self.reloader is not None:
            await self.reloader.stop()
        if self.jobs is not None:
            await self.jobs.stop()  # first: a workflow job's run is cancelled with its job
        if self.fusion is not None:
            await self.fusion.stop()  # the runs left are cancelled, and stored so
        if self.deliverer is not None:
            await self.deliverer.stop()
        await self.models.close()
        # Graphs patched since their last save; a crash skips this and the next load takes
        # the difference from SQLite.
        await asyncio.to_thread(self.rag.db.flush_index)
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
