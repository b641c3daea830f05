"""The web UI's pages under /ui (docs/ui.md): runs, a run, workflows, a workflow with its
start-a-run form, and the login form. Each handler fetches through the engine's
FusionService (server/ui/data.py), shapes with server/ui/views.py and renders a Jinja
template; errors are pages too (an unauthenticated page goes to the login form)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from litestar import Request, Response, Router, get, post
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from litestar.response import Redirect
from litestar.static_files import create_static_files_router
from litestar.status_codes import HTTP_303_SEE_OTHER

from engine.config import Settings
from engine.errors import FusionError
from engine.fusion.run_history import RUN_STATUSES, RunQuery, split_statuses
from engine.fusion.service import FusionService
from server.auth import AuthenticationFailed
from server.ui import data, forms, security, views
from server.ui.dag import trace_layout, workflow_layout

HERE = Path(__file__).parent
PAGE_SIZE = 50

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    # Every page is HTML: escape everything printed, whatever the template's name.
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters["duration"] = views.duration
templates.filters["when"] = views.when


def page(name: str, settings: Settings, status_code: int = 200, **context: Any) -> Response[str]:
    html = templates.get_template(name).render(
        keys_required=security.keys_required(settings), **context
    )
    return Response(html, status_code=status_code, media_type="text/html; charset=utf-8")


def _settings(request: Request[Any, Any, Any]) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


# -- errors ---------------------------------------------------------------------------------
def error_page(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """A UI request's error as a page: the login form when the key is missing, else the
    error's message with its status."""
    if isinstance(exc, AuthenticationFailed) and request.method == "GET":
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return Redirect(f"/ui/login?{urlencode({'next': target})}", status_code=303)
    if isinstance(exc, FusionError):
        status, message, code = exc.status, exc.message, exc.code.value
    elif isinstance(exc, HTTPException):
        status, message, code = exc.status_code, str(exc.detail), ""
    else:  # not registered for other exceptions: the app's handler answers those
        raise exc
    titles = {401: "Key needed", 403: "Refused", 404: "Not found"}
    return page(
        "error.html",
        _settings(request),
        status_code=status,
        status=status,
        title=titles.get(status, "Error"),
        message=message,
        code=code,
        refresh=None,
    )


# -- runs -----------------------------------------------------------------------------------
@get("/runs", name="ui_runs")
async def runs_page(
    request: Request[Any, Any, Any],
    fusion: NamedDependency[FusionService],
    settings: NamedDependency[Settings],
) -> Response[str]:
    params = request.query_params
    workflow = params.get("workflow") or None
    status = params.get("status") or None
    limit = _int(params.get("limit"), PAGE_SIZE, 1, 1000)
    offset = _int(params.get("offset"), 0, 0, None)
    filters: dict[str, Any] = {"workflow": workflow, "status": status}
    context: dict[str, Any] = {
        "section": "runs",
        "filters": filters,
        "statuses": RUN_STATUSES,
        "workflow_ids": sorted(info.workflow.id for info in fusion.list_workflows()),
        "limit": limit,
        "offset": offset,
        "self_url": _runs_url(filters, limit, offset),
    }
    query = RunQuery(
        workflow=workflow,
        statuses=split_statuses([status]) if status else (),
        limit=limit,
        offset=offset,
    )
    listing = await data.list_runs(fusion, query)
    context.update(
        runs=listing.runs,
        total=listing.total,
        prev_url=_runs_url(filters, limit, max(offset - limit, 0)) if offset > 0 else None,
        next_url=_runs_url(filters, limit, offset + limit)
        if offset + limit < listing.total
        else None,
    )
    return page("runs.html", settings, **context)


def _int(text: str | None, default: int, low: int, high: int | None) -> int:
    try:
        value = int(text) if text else default
    except ValueError:
        value = default
    value = max(value, low)
    return min(value, high) if high is not None else value


def _runs_url(filters: dict[str, Any], limit: int, offset: int) -> str:
    params = {k: v for k, v in filters.items() if v}
    if limit != PAGE_SIZE:
        params["limit"] = limit
    if offset:
        params["offset"] = offset
    return "/ui/runs" + (f"?{urlencode(params)}" if params else "")


@get("/runs/{run_id:str}", name="ui_run")
async def run_page(
    fusion: NamedDependency[FusionService],
    settings: NamedDependency[Settings],
    run_id: FromPath[str],
) -> Response[str]:
    body = await data.run_body(fusion, run_id)
    trace: list[dict[str, Any]] = body.get("execution_trace") or []
    # An inline run's definition compiles off the loop (it may be large).
    wf = await asyncio.to_thread(data.run_workflow, fusion, body)
    definition: dict[str, Any] | None
    if wf is not None:
        layout = workflow_layout(wf)
        definition = wf.definition
    else:
        layout = trace_layout([(e["step"], e.get("type", "")) for e in trace])
        definition = body.get("definition")
    statuses = {e["step"]: e.get("status", "pending") for e in trace}
    tl = views.timeline(trace)
    # How long the run has gone on by the server's clock, for the script's live bars (the
    # browser's clock may differ).
    elapsed_ms = (datetime.now(UTC) - tl.origin).total_seconds() * 1000 if tl.origin else 0
    return page(
        "run.html",
        settings,
        section="runs",
        run=body,
        layout=layout,
        statuses=statuses,
        tl=tl,
        elapsed_ms=round(elapsed_ms),
        steps=views.step_views(trace, definition),
        result_text=views.shown(body.get("result")),
        input_text=views.shown(body.get("input")) if body.get("input") is not None else "",
    )


# -- workflows ------------------------------------------------------------------------------
@get("/workflows", name="ui_workflows")
async def workflows_page(
    fusion: NamedDependency[FusionService], settings: NamedDependency[Settings]
) -> Response[str]:
    rows = [
        {
            "id": info.workflow.id,
            "name": info.workflow.name,
            "description": info.workflow.description,
            "required_models": info.workflow.required_models,
            "source": info.source,
            "version": info.workflow.version,
        }
        for info in fusion.list_workflows()
    ]
    return page("workflows.html", settings, section="workflows", workflows=rows)


def _workflow_page(
    fusion: FusionService,
    settings: Settings,
    workflow_id: str,
    *,
    given: dict[str, str] | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> Response[str]:
    info = fusion.get_workflow(workflow_id)
    wf = info.workflow
    models = [{"id": m.id, "type": m.type} for m in fusion.models.entries()]
    roles = [
        {
            "name": role,
            "type": spec.type,
            "optional": spec.optional,
            "selected": (given or {}).get(forms.MODEL_PREFIX + role, ""),
        }
        for role, spec in wf.models.items()
    ]
    return page(
        "workflow.html",
        settings,
        status_code=status_code,
        section="workflows",
        wf=wf,
        source=info.source,
        created_at=info.created_at,
        layout=workflow_layout(wf),
        fields=forms.fields(wf.input_schema, given),
        roles=roles,
        models=models,
        error=error,
        schema_text=json.dumps(wf.input_schema, indent=2, ensure_ascii=False),
    )


@get("/workflows/{workflow_id:str}", name="ui_workflow")
async def workflow_page(
    fusion: NamedDependency[FusionService],
    settings: NamedDependency[Settings],
    workflow_id: FromPath[str],
) -> Response[str]:
    return _workflow_page(fusion, settings, workflow_id)


@post("/workflows/{workflow_id:str}/run", name="ui_start_run")
async def start_run(
    request: Request[Any, Any, Any],
    fusion: NamedDependency[FusionService],
    settings: NamedDependency[Settings],
    workflow_id: FromPath[str],
) -> Response[Any]:
    """Start a run from the form and go to its page (303); a refused input shows the form
    again with the values given and the reason (400)."""
    security.check_same_origin(request, settings)
    form = {k: str(v) for k, v in (await request.form()).items()}
    wf = fusion.get_workflow(workflow_id).workflow
    try:
        prepared = await fusion.prepare(
            workflow_id, forms.read_input(wf.input_schema, form), forms.read_models(form)
        )
    except FusionError as exc:
        if exc.status >= 500 and exc.status != 503:
            raise
        where = f" ({exc.param})" if exc.param else ""
        return _workflow_page(
            fusion,
            settings,
            workflow_id,
            given=form,
            error=f"{exc.message}{where}",
            status_code=exc.status,
        )
    data.start_run(fusion, prepared)
    return Redirect(f"/ui/runs/{prepared.run_id}", status_code=HTTP_303_SEE_OTHER)


# -- login ----------------------------------------------------------------------------------
@get("/login", name="ui_login")
async def login_page(request: Request[Any, Any, Any]) -> Response[str]:
    settings = _settings(request)
    target = security.safe_next(request.query_params.get("next"))
    return page("login.html", settings, section="login", next=target, error=None)


@post("/login", name="ui_login_post")
async def login(request: Request[Any, Any, Any]) -> Response[Any]:
    settings = _settings(request)
    security.check_same_origin(request, settings)
    form = await request.form()
    target = security.safe_next(str(form.get("next") or ""))
    key = str(form.get("key") or "")
    if security.keys_required(settings) and not security.valid_key(settings, key):
        return page(
            "login.html",
            settings,
            status_code=401,
            section="login",
            next=target,
            error="That key is not valid.",
        )
    response: Response[Any] = Redirect(target, status_code=HTTP_303_SEE_OTHER)
    if security.keys_required(settings):
        response.set_cookie(security.key_cookie(request, settings, key))
    return response


@post("/logout", name="ui_logout")
async def logout(request: Request[Any, Any, Any]) -> Response[Any]:
    security.check_same_origin(request, _settings(request))
    response: Response[Any] = Redirect("/ui/login", status_code=HTTP_303_SEE_OTHER)
    response.set_cookie(security.cleared_cookie())
    return response


@get("/", name="ui_home")
async def home() -> Redirect:
    return Redirect("/ui/runs", status_code=HTTP_303_SEE_OTHER)


static = create_static_files_router(
    path="/static",
    directories=[HERE / "static"],
    name="ui_static",
    include_in_schema=False,
)

router = Router(
    path="/ui",
    route_handlers=[
        home,
        runs_page,
        run_page,
        workflows_page,
        workflow_page,
        start_run,
        login_page,
        login,
        logout,
        static,
    ],
    include_in_schema=False,
    response_headers=security.PAGE_HEADERS,
    exception_handlers={FusionError: error_page, HTTPException: error_page},
)
