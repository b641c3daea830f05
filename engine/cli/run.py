"""`fusion run` and `fusion graph`: a workflow run in-process, or drawn."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from engine.cli.common import (
    EXIT_INVALID,
    EXIT_OK,
    EXIT_PARTIAL,
    json_object,
    out,
    parse_pairs,
    resolve,
)
from engine.config import Settings
from engine.dsl.graph import mermaid
from engine.logging import configure_logging
from engine.runtime.executor import RunLimits, Runner
from engine.runtime.trace import COMPLETED, FAILED


def cmd_run(args: argparse.Namespace) -> int:
    # structlog's unconfigured default prints to stdout, which must carry only the result
    # JSON (`fusion run ... | jq`); logs go to stderr, and the trace already has each error.
    configure_logging("console", "warning")
    workflow, catalog = resolve(args.workflow, args.workflows_dir)
    data = json_object(args.input_json, "input-json") or {}
    data.update(parse_pairs(args.input or [], "input"))
    config = json_object(args.config_json, "config-json")
    models = parse_pairs(args.model or [], "model", as_json=False)  # model ids are strings
    runner = Runner(catalog=catalog, limits=RunLimits.from_settings(Settings.load()))
    result = asyncio.run(runner.run(workflow, data, models=models, config=config))
    out(sys.stdout, json.dumps(result.to_dict(), indent=2, default=str))
    if result.status == COMPLETED:
        return EXIT_OK
    return EXIT_INVALID if result.status == FAILED else EXIT_PARTIAL


def cmd_graph(args: argparse.Namespace) -> int:
    workflow, _ = resolve(args.workflow, args.workflows_dir)
    out(sys.stdout, mermaid(workflow))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    for name, func, text in (
        ("run", cmd_run, "run a workflow in-process and print its result and trace"),
        ("graph", cmd_graph, "print a workflow's DAG as a Mermaid flowchart"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("workflow", help="a workflow file, or an id in --workflows-dir")
        p.add_argument("--workflows-dir", default="workflows")
        p.set_defaults(func=func)
        if name == "run":
            p.add_argument("--input", action="append", metavar="KEY=VALUE")
            p.add_argument("--input-json", metavar="JSON")
            p.add_argument("--config-json", metavar="JSON")
            p.add_argument("--model", action="append", metavar="ROLE=MODEL_ID")
