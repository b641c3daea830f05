"""`fusion run` and `fusion graph`: a workflow run (in-process, or on a server with
--server), or drawn.

In-process, a run whose steps call models starts an engine that loads only those models
(engine/runtime/local_models.py); a run that calls none (no model steps, or all of them mocked)
runs on a plain runner and loads nothing, its roles bound to the --model names as labels.
Loading and prompts go to stderr; stdout carries only the run's §3.1 body, the one POST
/api/fusion/orchestrate answers."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from engine.cli.common import (
    EXIT_OK,
    is_workflow_file,
    json_object,
    out,
    parse_value,
    read_data_file,
    resolve,
    run_exit,
    run_input,
    run_models,
)
from engine.cli.progress import Progress
from engine.config import Settings
from engine.dsl.catalog import WorkflowCatalog
from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.graph import mermaid
from engine.errors import InvalidRequest
from engine.fusion.run_body import as_json, run_response
from engine.logging import configure_logging
from engine.runtime.executor import RunLimits, Runner
from engine.runtime.local_models import ModelPlan, calls_models, load_models, plan_models
from engine.runtime.trace import RunResult

# A run's workflow_source: a file given on the command line, or an id in --workflows-dir
# (the server's "predefined" workflows are the files of its workflows directory).
FILE, PREDEFINED = "file", "predefined"


def parse_mocks(pairs: Sequence[str]) -> dict[str, Any]:
    """`--mock STEP=@FILE` (JSON, or YAML for .yaml/.yml) or `--mock STEP=VALUE` (JSON,
    else the text): step id -> the output it is given."""
    mocks: dict[str, Any] = {}
    for pair in pairs:
        step, sep, raw = pair.partition("=")
        if not sep or not step:
            raise InvalidRequest(
                f"--mock expects STEP=VALUE or STEP=@FILE, got {pair!r}", param="mock"
            )
        mocks[step] = read_data_file(raw[1:], "mock") if raw.startswith("@") else parse_value(raw)
    return mocks


def cmd_run(args: argparse.Namespace) -> int:
    # structlog's unconfigured default prints to stdout, which must carry only the result
    # JSON (`fusion run ... | jq`); logs go to stderr, and the trace already has each error.
    configure_logging("console", "warning")
    if args.server:
        if args.mock:
            raise InvalidRequest("--mock runs in-process only (not with --server)", param="mock")
        if args.interactive:
            raise InvalidRequest("--interactive runs in-process only (not with --server)")
        from engine.cli.remote import run_remote

        return run_remote(args)
    stdin_args = [a for a in (args.input_json, args.config_json) if a == "@-"]
    if len(stdin_args) + bool(args.interactive) > 1:
        raise InvalidRequest("standard input can be read once: by one @- or --interactive")
    settings = Settings.load(data_dir=args.data_dir)
    workflow, catalog = resolve(args.workflow, args.workflows_dir)
    data = run_input(args)
    if args.interactive:
        from engine.cli.prompt import ask_inputs

        data = ask_inputs(workflow.input_schema, data, sys.stdin, sys.stderr)
    config = json_object(args.config_json, "config-json")
    mocks = parse_mocks(args.mock or [])
    given = run_models(args)
    run = LocalRun(workflow, catalog, settings, data, config, mocks)
    if calls_models(workflow, mocks, catalog):
        plan = plan_models(workflow, mocks, catalog, given, settings)
        result, bound = asyncio.run(run.with_models(plan))
    else:
        result, bound = asyncio.run(run.plain(given))
    source = FILE if is_workflow_file(args.workflow) else PREDEFINED
    body = as_json(run_response(result, source=source, models=bound, stored=False))
    out(sys.stdout, json.dumps(body, indent=2, default=str))
    return run_exit(result.status)


class LocalRun:
    """One in-process run: on a plain runner, or on an engine with the plan's models."""

    def __init__(
        self,
        workflow: CompiledWorkflow,
        catalog: WorkflowCatalog,
        settings: Settings,
        data: dict[str, Any],
        config: dict[str, Any] | None,
        mocks: Mapping[str, Any],
    ) -> None:
        self.workflow, self.catalog, self.settings = workflow, catalog, settings
        self.data, self.config, self.mocks = data, config, mocks

    async def plain(self, labels: dict[str, str]) -> tuple[RunResult, dict[str, Any]]:
        """No step calls a model: `labels` binds roles to names no step loads."""
        runner = Runner(catalog=self.catalog, limits=RunLimits.from_settings(self.settings))
        return await self._run(runner, labels)

    async def with_models(self, plan: ModelPlan) -> tuple[RunResult, dict[str, Any]]:
        from engine.services import Engine

        if not plan.specs():  # the roles its model steps use are optional and not given
            return await self.plain({})
        # The models are loaded here, one line each on stderr, not as start-up models.
        engine = await Engine.start(replace(self.settings, startup_models=[]), load_workflows=False)
        try:
            for workflow in self.catalog:
                engine.catalog.add(workflow)
            given = await load_models(engine, plan, lambda line: out(sys.stderr, line))
            assert engine.fusion is not None
            engine.fusion.check_models(self.workflow, given)  # a given model serves its role
            return await self._run(engine.runner, given)
        finally:
            await engine.stop()

    async def _run(self, runner: Runner, given: dict[str, str]) -> tuple[RunResult, dict[str, Any]]:
        bound = runner.bind_models(self.workflow, given, lenient=bool(self.mocks))
        progress = Progress(sys.stderr)
        try:
            result = await runner.run(
                self.workflow,
                self.data,
                models=bound,
                config=self.config,
                mocks=self.mocks,
                on_event=lambda event: progress(event["event"], event),
            )
        finally:
            progress.end()
        return result, bound


def cmd_graph(args: argparse.Namespace) -> int:
    workflow, _ = resolve(args.workflow, args.workflows_dir)
    out(sys.stdout, mermaid(workflow))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    for name, func, text in (
        ("run", cmd_run, "run a workflow (in-process, or on a server) and print its result"),
        ("graph", cmd_graph, "print a workflow's DAG as a Mermaid flowchart"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("workflow", help="a workflow file, or an id in --workflows-dir")
        p.add_argument("--workflows-dir", default="workflows")
        p.set_defaults(func=func)
        if name == "run":
            _run_arguments(p)


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run a workflow and print the run as POST /api/fusion/orchestrate answers it (the "
        "§3.1 body); exit 0 completed, 1 failed, 3 partial, 2 refused. In-process, the "
        "models its steps use are loaded first (--model, else startup_models of "
        "fusion.yaml); with --server the run is made there, progress on stderr."
    )
    p.add_argument("--input", action="append", metavar="KEY=VALUE", help="an input field")
    p.add_argument("--input-json", metavar="JSON|@FILE", help="the input object (@- reads stdin)")
    p.add_argument("--config-json", metavar="JSON|@FILE", help="config overrides")
    p.add_argument(
        "--model",
        action="append",
        metavar="ROLE=MODEL",
        help="a model directory (loaded as the role's type), 'echo' (a fake model), or the "
        "id of a start-up model; on a server, a loaded model's id",
    )
    p.add_argument(
        "--mock",
        action="append",
        metavar="STEP=VALUE|@FILE",
        help="the output of a step, which then does not run (in-process only)",
    )
    p.add_argument(
        "--interactive",
        action="store_true",
        help="ask on the terminal for each input field not given",
    )
    p.add_argument("--data-dir", help="the engine's data directory (default: settings)")
    p.add_argument("--server", metavar="URL", help="run on this Fusion server")
    p.add_argument(
        "--api-key", metavar="KEY", help="the server's API key (default: $FUSION_API_KEY)"
    )
