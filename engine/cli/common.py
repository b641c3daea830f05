"""What the commands share: exit codes, output, argument parsing and workflow lookup."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from engine.dsl.catalog import WorkflowCatalog, compile_files
from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.discovery import WORKFLOW_SUFFIXES, files_to_check
from engine.dsl.issues import WorkflowInvalid, format_issues
from engine.dsl.source import load_text
from engine.errors import InvalidRequest
from engine.runtime.trace import COMPLETED, FAILED
from engine.steps.registry import default_registry

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
_RUN_EXIT = {COMPLETED: EXIT_OK, FAILED: EXIT_INVALID}


def run_exit(status: Any) -> int:
    """A run's exit code: 0 completed, 1 failed, 3 partial (in-process or on a server)."""
    return _RUN_EXIT.get(str(status), EXIT_PARTIAL)


def out(stream: TextIO, text: str) -> None:
    stream.write(text if text.endswith("\n") else text + "\n")


def catalog_ids(directory: str | None, registry: Any, exclude: Sequence[Path] = ()) -> list[str]:
    """Ids of the workflows in the workflows directory, so files may call them."""
    if not directory or not Path(directory).is_dir():
        return []
    excluded = {p.resolve() for p in exclude}
    others = [p for p in files_to_check([directory]) if p.resolve() not in excluded]
    compiled, _ = compile_files(others, registry)
    return list(compiled)


def is_workflow_file(target: str) -> bool:
    """Whether a command's WORKFLOW argument names a file (else a workflow id)."""
    return Path(target).suffix in WORKFLOW_SUFFIXES or Path(target).exists()


def resolve(target: str, workflows_dir: str | None) -> tuple[CompiledWorkflow, WorkflowCatalog]:
    registry = default_registry()
    catalog = WorkflowCatalog(registry)
    if workflows_dir and Path(workflows_dir).is_dir():
        # Only to resolve `workflow` steps by id: a broken file there must not stop an
        # unrelated run, so it is reported and left out (`fusion validate` shows it whole).
        compiled, issues = compile_files(files_to_check([workflows_dir]), registry)
        for path, found in issues.items():
            out(sys.stderr, f"warning: {path} skipped: {len(found)} error(s)")
        for workflow in compiled.values():
            catalog.add(workflow)
    path = Path(target)
    if path.suffix in WORKFLOW_SUFFIXES and not path.exists():
        raise InvalidRequest(f"no such workflow file: {target}", param="workflow")
    if is_workflow_file(target):
        compiled, issues = compile_files([path], registry, catalog.ids())
        if issues:
            raise WorkflowInvalid(issues[path])
        workflow = next(iter(compiled.values()))
        catalog.add(workflow)
        return workflow, catalog
    return catalog.get(target), catalog


def parse_value(raw: str) -> Any:
    """A command-line value: JSON when it parses (numbers, booleans, lists, objects),
    else the text itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def run_input(args: Any) -> dict[str, Any]:
    """A run's input: --input-json (inline or @FILE), then each --input KEY=VALUE over it."""
    data = json_object(args.input_json, "input-json") or {}
    data.update(parse_pairs(args.input or [], "input"))
    return data


def run_models(args: Any) -> dict[str, str]:
    """A run's --model ROLE=MODEL pairs (paths and ids are strings, not JSON)."""
    return parse_pairs(args.model or [], "model", as_json=False)


def parse_pairs(pairs: Sequence[str], what: str, *, as_json: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            # A usage error (exit 2), not SystemExit's 1, which means "the run failed".
            raise InvalidRequest(f"--{what} expects key=value, got {pair!r}", param=what)
        out[key] = parse_value(raw) if as_json else raw
    return out


def read_data_file(name: str, flag: str) -> Any:
    """The value in the file an `@FILE` argument names: YAML for .yaml/.yml (the workflow
    loader's safe types and limits), else JSON; `-` is standard input (JSON)."""
    if name == "-":
        text, where = sys.stdin.read(), "<stdin>"
    else:
        try:
            text, where = Path(name).read_text(encoding="utf-8"), name
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise InvalidRequest(f"--{flag}: cannot read {name}: {reason}", param=flag) from None
        if Path(name).suffix in (".yaml", ".yml"):
            try:
                return load_text(text, name).data
            except WorkflowInvalid as exc:
                raise InvalidRequest(
                    f"--{flag}: {format_issues(exc.issues, 'text')}", param=flag
                ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"--{flag}: {where}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}", param=flag
        ) from None
    except RecursionError:
        raise InvalidRequest(f"--{flag}: {where} nests too deeply", param=flag) from None


def json_object(text: str | None, flag: str) -> dict[str, Any] | None:
    """The object an argument holds: inline JSON, or `@FILE` (read_data_file)."""
    if text is None:
        return None
    try:
        value = read_data_file(text[1:], flag) if text.startswith("@") else json.loads(text)
    except RecursionError:
        raise InvalidRequest(f"--{flag} nests too deeply", param=flag) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"--{flag} must be a JSON object", param=flag)
    return value
