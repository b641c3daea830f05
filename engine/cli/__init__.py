"""The ``fusion`` command: validate, run, graph, steps, schema, serve, ingest, models."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from engine.cli import info, ingest, models, run, serve, validate, workflow_tests
from engine.cli.common import EXIT_INVALID, EXIT_USAGE, out
from engine.cli.extras import MissingExtra, missing_extra
from engine.dsl.issues import WorkflowInvalid, format_issues
from engine.errors import FusionError

# Each command module adds its subcommands, in the order `fusion --help` lists them.
COMMANDS = (validate, run, info, serve, ingest, models, workflow_tests)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except WorkflowInvalid as exc:
        out(sys.stdout, format_issues(exc.issues, getattr(args, "format", "text")))
        return EXIT_INVALID
    except FusionError as exc:
        out(sys.stderr, f"error: {exc.message}")
        return EXIT_USAGE
    except json.JSONDecodeError as exc:
        out(sys.stderr, f"error: invalid JSON: {exc}")
        return EXIT_USAGE
    except MissingExtra as exc:
        out(sys.stderr, f"error: {exc}")
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None:
            raise
        out(sys.stderr, f"error: {MissingExtra(args.command, [extra])}")
        return EXIT_USAGE
