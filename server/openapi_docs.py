"""The §7 error envelope in the OpenAPI document.

Litestar documents a handler's 400 as its own `{"status_code", "detail"}` body, which this
server never sends (server/errors.py answers every error in the envelope). A route lists
the error statuses it can answer with `responses=error_responses(400, 404, ...)`; each is
documented as the envelope, replacing Litestar's default for the same status.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar.openapi import ResponseSpec

from engine.errors import ERROR_TYPES


class ErrorDetail(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: str
    message: str
    param: str | None
    code: str
    # Validation errors list each failed field here (server/errors.py).
    details: Any = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """`responses=` for a route decorator: each status documented as the §7 envelope."""
    return {
        status: ResponseSpec(
            data_container=ErrorEnvelope,
            description=f"{ERROR_TYPES[status]} (§7 envelope)",
            generate_examples=False,
        )
        for status in statuses
    }
