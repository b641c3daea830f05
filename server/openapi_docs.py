"""What the OpenAPI document must say that Litestar does not derive by itself.

Error bodies: Litestar documents a handler's 400 as its own `{"status_code", "detail"}`
body, which this server never sends (server/errors.py answers every error in the §7
envelope). A route lists the error statuses it can answer with
`responses=error_responses(400, 404, ...)`; each is documented as the envelope, replacing
Litestar's default for the same status.

Closed request bodies: a Struct with `forbid_unknown_fields=True` refuses a field it does
not declare (400), but Litestar's schema leaves `additionalProperties` open, so generated
clients and fuzzers send bodies the document allows and the server refuses.
`ClosedStructSchemaPlugin` (an app plugin) documents `additionalProperties: false` for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

# Litestar keeps its Struct schema plugin private; the subclass adds one keyword to it
# rather than copying how it maps fields.
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.openapi import ResponseSpec

from engine.errors import ERROR_TYPES, ErrorDetail

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.openapi.spec import Schema
    from litestar.typing import FieldDefinition


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


class ClosedStructSchemaPlugin(StructSchemaPlugin):
    """`additionalProperties: false` for a Struct that forbids unknown fields."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        if not super().is_plugin_supported_field(field_definition):
            return False
        info = msgspec.inspect.type_info(field_definition.type_)
        return isinstance(info, msgspec.inspect.StructType) and info.forbid_unknown_fields

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        schema.additional_properties = False
        return schema
