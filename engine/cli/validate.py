"""`fusion validate`: compile and lint workflow files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from engine.cli.common import EXIT_INVALID, EXIT_OK, catalog_ids, out
from engine.dsl.catalog import compile_files
from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.discovery import files_to_check
from engine.dsl.issues import Issue
from engine.dsl.lint import Finding, Severity, lint
from engine.dsl.lint.output import COMPILE_RULE, Summary, render
from engine.dsl.source import load_text
from engine.steps.registry import default_registry


def cmd_validate(args: argparse.Namespace) -> int:
    files = files_to_check(args.paths, args.exclude or ())
    missing = [p for p in files if not p.exists()]
    registry = default_registry()
    extra = catalog_ids(args.workflows_dir, registry, exclude=files)
    compiled, issues = compile_files([p for p in files if p.exists()], registry, extra)
    for path in missing:
        issues[path] = [Issue("no such file or directory", (), str(path))]
    findings = [Finding(COMPILE_RULE, Severity.ERROR, i) for p in files for i in issues.get(p, [])]
    findings += _lint(compiled.values())
    order = {str(p): i for i, p in enumerate(files)}
    findings.sort(key=lambda f: order.get(f.issue.file or "", 0))  # stable: lines stay sorted
    summary = Summary.of(len(files), findings)
    report = render(findings, summary, args.format)
    if report:
        out(sys.stdout, report)
    bad = len({f.issue.file for f in findings if f.severity is Severity.ERROR})
    out(
        sys.stderr,
        f"{len(files)} file(s) checked, {summary.errors} error(s) in {bad} file(s), "
        f"{summary.warnings} warning(s), {summary.infos} info(s)",
    )
    failed = summary.errors or (args.strict and summary.warnings) or not files
    return EXIT_INVALID if failed else EXIT_OK


def _lint(workflows: Iterable[CompiledWorkflow]) -> list[Finding]:
    """Lint findings of the files that compiled, file by file in the order checked."""
    found: list[Finding] = []
    for workflow in workflows:
        if workflow.file is not None:
            # The compiled workflow keeps no positions or comments: the file is read again.
            text = Path(workflow.file).read_text(encoding="utf-8")
            found += lint(workflow, load_text(text, workflow.file), text)
    return found


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check workflow files without running them")
    p.add_argument("paths", nargs="+", help="workflow files or directories")
    p.add_argument("--format", choices=["text", "json", "github", "sarif"], default="text")
    p.add_argument("--workflows-dir", default="workflows", help="ids a workflow step may call")
    p.add_argument("--strict", action="store_true", help="warnings fail too (exit 1)")
    p.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="skip matching files (repeatable), e.g. 'drafts/*' or '*.test.yaml'",
    )
    p.set_defaults(func=cmd_validate)
