"""`fusion test`: run the test cases beside workflows (`<name>.test.yaml`, docs/testing.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from engine.cli.common import EXIT_INVALID, EXIT_OK, EXIT_USAGE, out
from engine.dsl.discovery import WORKFLOW_SUFFIXES
from engine.logging import configure_logging
from engine.steps.registry import default_registry
from engine.testing.cases import TEST_SUFFIXES, TestFile, is_test_file, load_test_file
from engine.testing.models import CaseModels
from engine.testing.running import ERROR, FAILED, PASSED, Outcome, Workspace, run_file

_LABELS = {PASSED: "PASS", FAILED: "FAIL", ERROR: "ERROR"}


def find_test_files(paths: Sequence[str]) -> list[Path] | str:
    """The test files named (a workflow file stands for the test file beside it) or found in
    directories, hidden ones skipped, in sorted order; or why a path is no use."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if is_test_file(p)
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif is_test_file(path) and path.is_file():
            found.append(path)
        elif path.suffix in WORKFLOW_SUFFIXES and path.is_file():
            beside = [path.with_suffix(s) for s in TEST_SUFFIXES if path.with_suffix(s).is_file()]
            if not beside:
                return f"no test file beside {path} (expected {path.with_suffix('.test.yaml')})"
            found += beside
        else:
            return f"no such test file or directory: {path}"
    unique: dict[Path, Path] = {}
    for path in found:  # a file named and also found in a directory named runs once
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


async def _run_all(files: list[Path], selector: str | None, workspace: Workspace) -> list[Outcome]:
    outcomes: list[Outcome] = []
    try:
        for path in files:
            test: TestFile = load_test_file(path)
            cases = [c for c in test.cases if selector is None or selector in f"{path}::{c.name}"]
            if cases or test.issues:
                outcomes += await run_file(test, cases, workspace)
    finally:
        await workspace.close()
    return outcomes


def cmd_test(args: argparse.Namespace) -> int:
    configure_logging("console", "warning")  # stdout carries the report alone
    files = find_test_files(args.paths)
    if isinstance(files, str):
        out(sys.stderr, f"error: {files}")
        return EXIT_USAGE
    workflows_dir = Path(args.workflows_dir) if args.workflows_dir else None
    # Loading lines go to stderr, as fusion run's do: stdout carries the report alone.
    models = CaseModels(lambda line: out(sys.stderr, line))
    workspace = Workspace(default_registry(), workflows_dir, models)
    started = time.perf_counter()
    outcomes = asyncio.run(_run_all(files, args.k, workspace))
    seconds = time.perf_counter() - started
    if not outcomes:
        what = f"no test case matches -k {args.k!r}" if args.k else "no test cases found"
        out(sys.stderr, f"error: {what} in {', '.join(args.paths)}")
        return EXIT_USAGE
    counts = {s: sum(o.status == s for o in outcomes) for s in (PASSED, FAILED, ERROR)}
    if args.format == "json":
        report = {
            "cases": [
                {
                    "id": o.id,
                    "file": str(o.file),
                    "case": o.case,
                    "status": o.status,
                    "duration_ms": o.duration_ms,
                    "problems": [p.to_dict() for p in o.problems],
                }
                for o in outcomes
            ],
            "summary": {**counts, "duration_s": round(seconds, 3)},
        }
        out(sys.stdout, json.dumps(report, indent=2))
    else:
        for o in outcomes:
            timing = f" ({o.duration_ms:.0f} ms)" if o.status != ERROR else ""
            out(sys.stdout, f"{_LABELS[o.status]} {o.id}{timing}")
            for problem in o.problems:
                out(sys.stdout, f"    {problem.text()}")
        summary = f"{counts[PASSED]} passed, {counts[FAILED]} failed"
        if counts[ERROR]:
            summary += f", {counts[ERROR]} error(s)"
        out(sys.stdout, f"{summary} in {seconds:.2f} s")
    return EXIT_OK if counts[PASSED] == len(outcomes) else EXIT_INVALID


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("test", help="run the test cases beside workflows (*.test.yaml)")
    p.add_argument(
        "paths",
        nargs="*",
        default=["workflows"],
        help="test files, workflow files or directories (default: workflows)",
    )
    p.add_argument("-k", metavar="SUBSTRING", help="run only cases whose FILE::NAME contains it")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--workflows-dir", default="workflows", help="ids a `workflow` step may call")
    p.set_defaults(func=cmd_test)
