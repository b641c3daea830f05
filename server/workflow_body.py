"""The body of `POST /api/fusion/compose`: one workflow document, sent as JSON or as YAML
(the text a workflow file holds), read by hand because the edge guard's content-type check
(server/guards.py) admits JSON only on routes whose body Litestar decodes.

- JSON (`application/json`, `application/*+json`) is read as Litestar would, with the edge's
  `max_json_depth` check.
- YAML (`application/yaml`, `application/x-yaml`, `text/yaml`) goes through the workflow
  loader (engine/dsl/source.py), under the same document limits as a workflow file: size,
  depth, and aliases counted as expanded. A syntax error is a 400 naming its line:column.
  The document is then taken as the JSON it converts to (what is stored, and what a JSON
  body would have carried): a date becomes its ISO string, binary its base64, `.inf` and
  `.nan` become null.
- Anything else: 415.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request

from engine.dsl.issues import WorkflowInvalid
from engine.dsl.source import load_text
from engine.errors import ErrorCode, InvalidRequest
from server.guards import JsonDepthCounter, UnsupportedMediaType, is_json_media_type

YAML_MEDIA_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")


async def read_workflow_document(
    request: Request[Any, Any, Any], max_json_depth: int
) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    if is_json_media_type(content_type):
        return _from_json(await request.body(), max_json_depth)
    if content_type.split(";", 1)[0].strip().lower() in YAML_MEDIA_TYPES:
        return _from_yaml(await request.body())
    raise UnsupportedMediaType(
        "send the workflow document as JSON (Content-Type application/json) or YAML "
        f"(application/yaml), not {content_type or 'none'}",
        param="Content-Type",
    )


def _from_json(body: bytes, max_depth: int) -> dict[str, Any]:
    if not JsonDepthCounter(max_depth).feed(body):
        raise InvalidRequest(
            f"the JSON body is nested deeper than {max_depth} levels (the max_json_depth setting)",
            code=ErrorCode.JSON_TOO_DEEP,
        )
    try:
        document: dict[str, Any] = msgspec.json.decode(body, type=dict[str, Any])
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"the body must be a workflow document (an object): {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    return document


def _from_yaml(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the YAML body is not UTF-8: {exc}") from None
    try:
        data = load_text(text).data
    except WorkflowInvalid as exc:
        first = exc.issues[0]
        where = f"body:{first.line}:{first.col}: " if first.line is not None else "body: "
        raise InvalidRequest(
            where + first.message,
            code=ErrorCode.INVALID_WORKFLOW,
            details=[issue.to_dict() for issue in exc.issues],
        ) from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise InvalidRequest(f"the YAML body must be a workflow document (a mapping), not {kind}")
    document: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(data))
    return document
