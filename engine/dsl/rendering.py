"""Render a workflow value under budgets.

Provably linear templates (engine.dsl.templating: no loops, calls, repetition, powers or
%-formatting) render in-process. The others render in the sandbox (engine.sandbox), all of
one value's in one call, with a time and memory budget; the context sent there is pruned
to what those templates read, so a step reading one field does not ship every output.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import structlog

from engine.dsl.templating import Template, TemplateRenderError
from engine.dsl.values import Value
from engine.sandbox import (
    Budget,
    SandboxCrashed,
    SandboxError,
    SandboxMemoryError,
    SandboxTimeout,
    shared_sandbox,
)

log = structlog.get_logger(__name__)

_TARGET = "engine.dsl.rendering:render_batch"


async def render(
    value: Value, scope: Mapping[str, Any], budget: Budget, timeout_s: float | None = None
) -> Any:
    """``value`` rendered against ``scope``; ``timeout_s`` (a step's) tightens the budget.
    Any failure is a TemplateRenderError, which fails the step reading the value: anything
    else escaping would end the whole run unfinished and unstored."""
    if not value.sandboxed:
        return value.render(scope)
    templates = value.sandboxed
    payload = {"templates": [t.source for t in templates], "context": _pruned(templates, scope)}
    limit = budget.timeout_s if timeout_s is None else min(budget.timeout_s, timeout_s)
    try:
        results = await shared_sandbox().call(
            _TARGET, payload, timeout_s=limit, memory_mb=budget.memory_mb
        )
    except SandboxTimeout:
        raise TemplateRenderError(
            f"refused: rendering exceeded its time budget of {limit:g} s "
            f"(setting template_timeout_s, or the step's timeout_s) in {_short(templates)}"
        ) from None
    except SandboxMemoryError:
        raise TemplateRenderError(
            f"refused: rendering exceeded its memory budget of {budget.memory_mb} MB "
            f"(setting template_memory_mb) in {_short(templates)}"
        ) from None
    except SandboxCrashed as exc:
        raise TemplateRenderError(
            f"refused: {exc.message}, most likely at its memory budget of {budget.memory_mb} MB "
            f"(setting template_memory_mb) in {_short(templates)}"
        ) from None
    except SandboxError as exc:
        if exc.type_name == "TemplateRenderError":
            raise TemplateRenderError(exc.message) from None
        # Raised in the worker outside Template.render: its result could not be sent back
        # (an integer past 64 bits), or a fault in the worker's own code.
        log.warning("template_sandbox_error", error_type=exc.type_name, error=exc.message)
        raise TemplateRenderError(f"{exc} in {_short(templates)}") from None
    except (TypeError, OverflowError) as exc:  # the context is not plain data (msgpack)
        raise TemplateRenderError(f"the data read cannot be rendered: {exc}") from None
    except Exception as exc:
        # The sandbox itself failed (no worker could start, the pool is closed): the
        # engine's fault, logged as such, but still this step's failure.
        log.error("template_sandbox_failed", error_type=type(exc).__name__, exc_info=exc)
        raise TemplateRenderError(
            f"the template sandbox failed ({type(exc).__name__}: {exc}) in {_short(templates)}"
        ) from None
    return value.render(scope, dict(zip(templates, results, strict=True)))


def _short(templates: tuple[Template, ...]) -> str:
    source = templates[0].source if len(templates) == 1 else "one of the value's templates"
    return repr(source) if len(source) <= 200 else repr(source[:200]) + "..."


def _pruned(templates: tuple[Template, ...], scope: Mapping[str, Any]) -> dict[str, Any]:
    """The scope's roots the templates read; of a mapping root read only through constant
    keys (``steps.retrieve``, ``input.query``), only those keys."""
    wanted: dict[str, set[str | int] | None] = {}
    for template in templates:
        for ref in template.references:
            if ref.root not in scope:
                continue
            keys = wanted.setdefault(ref.root, set())
            if keys is None:
                continue
            if ref.path:
                keys.add(ref.path[0])
            else:
                wanted[ref.root] = None
    context: dict[str, Any] = {}
    for root, keys in wanted.items():
        data = scope[root]
        if keys is None or not isinstance(data, Mapping):
            context[root] = data
        else:
            context[root] = {k: data[k] for k in keys if k in data}
    return context


# -- in the sandbox worker -------------------------------------------------------------------
_CACHE_SIZE = 512
_compiled: OrderedDict[str, Template] = OrderedDict()


def render_batch(payload: dict[str, Any]) -> list[Any]:
    """The worker's side: render each template source against the context."""
    context = payload["context"]
    results = []
    for source in payload["templates"]:
        template = _compiled.get(source)
        if template is None:
            template = _compiled[source] = Template(source, None)
            if len(_compiled) > _CACHE_SIZE:
                _compiled.popitem(last=False)
        results.append(template.render(context))
    return results
