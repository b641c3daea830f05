"""Where the pages get their data: the same engine calls the API's handlers make
(FusionService), shaped to the same JSON bodies (engine/fusion/run_body.py), so a page
shows exactly what the API answers."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from engine.dsl.compiled import CompiledWorkflow
from engine.errors import FusionError
from engine.fusion.live import RUNNING
from engine.fusion.run_body import run_fields
from engine.fusion.run_history import RunHistory, RunPage, RunQuery
from engine.fusion.runs import StoredRun
from engine.fusion.service import INLINE, FusionService, PreparedRun


async def run_body(fusion: FusionService, run_id: str) -> dict[str, Any]:
    """GET /api/fusion/runs/{id}?include=io's body (404 run_not_found): each step's
    rendered input and output with its entry, or `io_omitted` saying why there are none;
    plus the definition of an inline workflow's run (for its graph)."""
    run = await fusion.read_run(run_id, io=True)
    if run.result.status == RUNNING:
        return _run_body(run)  # a live run's records change on the loop: shaped there
    # An ended run's values may be large (up to runs_max_stored_bytes): off the loop.
    return await asyncio.to_thread(_run_body, run)


def _run_body(run: StoredRun) -> dict[str, Any]:
    io = run.io_omitted is None
    # A running step's output may hold what JSON has no type for (a YAML date, a set): as
    # text, as the store writes it.
    body: dict[str, Any] = msgspec.to_builtins(
        run_fields(run.result, source=run.workflow_source, models=run.models, io=io), enc_hook=str
    )
    body["input"] = run.request.input
    body["definition"] = run.request.definition
    if not io:
        body["io_omitted"] = run.io_omitted
    return body


def run_workflow(fusion: FusionService, body: dict[str, Any]) -> CompiledWorkflow | None:
    """The workflow a run ran, for its graph: an inline run's own definition, else the
    catalog's workflow of that id while it is the same version; None when it is gone."""
    try:
        if body.get("workflow_source") == INLINE and isinstance(body.get("definition"), dict):
            wf, _ = fusion.resolve("custom", body["definition"])
            return wf
        wf = fusion.get_workflow(str(body.get("workflow"))).workflow
    except FusionError:
        return None
    return wf if wf.version == body.get("workflow_version") else None


def start_run(fusion: FusionService, run: PreparedRun) -> None:
    """Start a prepared run and return without waiting for it to end; the run page then
    follows it. The run is the engine's (FusionService.start): a browser that leaves does
    not stop it."""
    fusion.start(run)


async def list_runs(fusion: FusionService, query: RunQuery) -> RunPage:
    """GET /api/fusion/runs's listing for `query` (SQLite read off the event loop)."""
    return await asyncio.to_thread(RunHistory(fusion.runs.store).list, query)
