"""`fusion steps` and `fusion schema`: what authors may write."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engine.cli.common import EXIT_OK, out
from engine.dsl.schema import generate
from engine.dsl.types import from_schema
from engine.steps.registry import default_registry


def cmd_schema(args: argparse.Namespace) -> int:
    text = json.dumps(generate(default_registry()), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_steps(args: argparse.Namespace) -> int:
    """The installed step types: their parameters and what their output holds, the
    listing an editor or an author reads beside the JSON Schema."""
    registry = default_registry()
    listing: list[dict[str, Any]] = [
        {
            "type": name,
            "description": plugin.description,
            "params_schema": plugin.params_schema,
            "output_schema": plugin.output_schema,
        }
        for name in registry.names()
        if (plugin := registry.get(name)) is not None
    ]
    if args.format == "json":
        out(sys.stdout, json.dumps(listing, indent=2))
        return EXIT_OK
    lines = []
    for item in listing:
        params = item["params_schema"].get("properties", {})
        required = set(item["params_schema"].get("required", []))
        names = ", ".join(f"{p}*" if p in required else p for p in params) or "none"
        lines += [
            f"{item['type']}: {item['description'].splitlines()[0] if item['description'] else ''}",
            f"  params: {names}   (* required)",
            f"  output: {_type_summary(item['output_schema'])}",
        ]
    out(sys.stdout, "\n".join(lines))
    return EXIT_OK


def _type_summary(schema: dict[str, Any]) -> str:
    """A schema as the checker's type; each alternative of an anyOf (shapes that depend on
    a parameter, as model_call's operation) on its own."""
    options = schema.get("anyOf")
    if isinstance(options, list):
        return " | ".join(_type_summary(option) for option in options)
    return str(from_schema(schema))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("steps", help="list the step types: parameters and output types")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_steps)

    p = sub.add_parser("schema", help="print the workflow JSON Schema")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_schema)
