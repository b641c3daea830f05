"""Domain errors. Each carries the spec's (§7) HTTP status, error type and code so the
server can render the envelope without knowing the error's origin.

Every code the server answers is an ErrorCode, and each member fixes the one HTTP status
its code goes with (the error type follows from the status, ERROR_TYPES): an error class
refuses a code of another status, so one code never reaches a client with two statuses.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

import msgspec


class ErrorCode(StrEnum):
    """Every `code` of an error envelope: §7's and ours, each with its one HTTP status
    (`status`). A StrEnum, so the JSON is the plain string."""

    status: int

    def __new__(cls, value: str, status: int = 0) -> ErrorCode:
        # The default is for the type checker only: `ErrorCode("code")` looks a member up
        # and never calls this; a member without its status fails test_error_codes.
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        return member

    INVALID_REQUEST = "invalid_request", 400
    INVALID_INPUT = "invalid_input", 400
    INVALID_WORKFLOW = "invalid_workflow", 400
    INVALID_CAPABILITY = "invalid_capability", 400
    INVALID_COLLECTION = "invalid_collection", 400
    INVALID_DOCUMENT = "invalid_document", 400
    INVALID_VECTOR = "invalid_vector", 400
    INVALID_IMAGE = "invalid_image", 400
    INVALID_LANGUAGE = "invalid_language", 400
    INVALID_LOGIT_BIAS = "invalid_logit_bias", 400
    INVALID_MODEL_ID = "invalid_model_id", 400
    INVALID_MODEL_PATH = "invalid_model_path", 400
    INVALID_MODEL_TYPE = "invalid_model_type", 400
    BACKEND_UNAVAILABLE = "backend_unavailable", 400
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded", 400
    PROMPT_TOO_LONG = "prompt_too_long", 400
    DIMENSION_MISMATCH = "dimension_mismatch", 400
    DIMENSIONS_NOT_SUPPORTED = "dimensions_not_supported", 400
    EMBEDDING_MODEL_MISMATCH = "embedding_model_mismatch", 400
    EMPTY_AUDIO = "empty_audio", 400
    UNSUPPORTED_AUDIO = "unsupported_audio", 400
    IMAGES_NOT_SUPPORTED = "images_not_supported", 400
    JSON_TOO_DEEP = "json_too_deep", 400
    METADATA_TOO_DEEP = "metadata_too_deep", 400
    METADATA_TOO_LARGE = "metadata_too_large", 400
    WRONG_MODEL_TYPE = "wrong_model_type", 400
    MODEL_UNAVAILABLE_OFFLINE = "model_unavailable_offline", 400
    UNKNOWN_FIELD = "unknown_field", 400
    UNSUPPORTED = "unsupported", 400
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type", 400
    UNSUPPORTED_FORMAT = "unsupported_format", 400
    UNSUPPORTED_PARAMETER = "unsupported_parameter", 400
    URL_NOT_ALLOWED = "url_not_allowed", 400
    URL_TIMEOUT = "url_timeout", 400
    URL_UNREACHABLE = "url_unreachable", 400
    INVALID_OPERATION = "invalid_operation", 400
    AUTHENTICATION_FAILED = "authentication_failed", 401
    PERMISSION_DENIED = "permission_denied", 403
    ORIGIN_NOT_ALLOWED = "origin_not_allowed", 403
    NOT_FOUND = "not_found", 404
    MODEL_NOT_FOUND = "model_not_found", 404
    RUN_NOT_FOUND = "run_not_found", 404
    COLLECTION_NOT_FOUND = "collection_not_found", 404
    DOCUMENT_NOT_FOUND = "document_not_found", 404
    JOB_NOT_FOUND = "job_not_found", 404
    WEBHOOK_NOT_FOUND = "webhook_not_found", 404
    METHOD_NOT_ALLOWED = "method_not_allowed", 405
    CONFLICT = "conflict", 409
    JOB_FINISHED = "job_finished", 409
    RUN_NOT_CANCELLABLE = "run_not_cancellable", 409
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused", 409
    MODEL_ALREADY_LOADED = "model_already_loaded", 409
    MODEL_IN_USE = "model_in_use", 409
    WORKFLOW_EXISTS = "workflow_exists", 409
    WORKFLOW_IN_USE = "workflow_in_use", 409
    WORKFLOW_PREDEFINED = "workflow_predefined", 409
    PAYLOAD_TOO_LARGE = "payload_too_large", 413
    DOCUMENT_TOO_LARGE = "document_too_large", 413
    RECORD_TOO_LARGE = "record_too_large", 413
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type", 415
    HOST_NOT_ALLOWED = "host_not_allowed", 421
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded", 429
    QUEUE_FULL = "queue_full", 429
    INTERNAL_ERROR = "internal_error", 500
    SERVICE_UNAVAILABLE = "service_unavailable", 503
    MODEL_NOT_LOADED = "model_not_loaded", 503
    MODEL_UNLOADED = "model_unloaded", 503
    INSUFFICIENT_VRAM = "insufficient_vram", 503
    ENGINE_NOT_RUNNING = "engine_not_running", 503
    SHUTTING_DOWN = "shutting_down", 503
    STORAGE_READ_ONLY = "storage_read_only", 503
    STORAGE_UNAVAILABLE = "storage_unavailable", 503
    STORAGE_BUSY = "storage_busy", 503
    TIMEOUT = "timeout", 504
    INSUFFICIENT_STORAGE = "insufficient_storage", 507


# HTTP status -> §7 error type. 405, 415 and 421 have no row in §7: they are the caller's
# mistake (invalid_request_error); 507 neither, and unlisted 5xx are internal_error
# (docs/decisions.md).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "payload_too_large_error",
    415: "invalid_request_error",
    421: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable_error",
    504: "timeout_error",
    507: "internal_error",
}

# Each code's one HTTP status. Its error type is ERROR_TYPES[status].
ERROR_STATUS: dict[ErrorCode, int] = {code: code.status for code in ErrorCode}

# Spec §7 gives `invalid_workflow` for "Workflow ID not found or invalid": an unknown
# workflow id is its 404, an invalid definition its 400 (docs/decisions.md). The only code
# with a second status.
_ALSO: dict[ErrorCode, int] = {ErrorCode.INVALID_WORKFLOW: 404}


def status_allows(code: ErrorCode, status: int) -> bool:
    """Whether ``code`` may be answered with ``status``."""
    return code.status == status or _ALSO.get(code) == status


class ErrorDetail(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The §7 error object, where a body carries one (the envelope's `error`, a run's
    storage `warning`)."""

    type: str
    message: str
    param: str | None
    code: str
    # Validation errors list each failed field here (server/errors.py).
    details: Any = None


class FusionError(Exception):
    status: ClassVar[int] = 500
    default_code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: ErrorCode | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        code = code or self.default_code
        if not status_allows(code, self.status):
            # A programming error, not the request's: tests/test_error_codes.py finds it
            # statically at every raise site.
            raise ValueError(f"{type(self).__name__} ({self.status}) cannot carry code '{code}'")
        self.message = message
        self.param = param
        self.code = code
        self.details = details
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return ERROR_TYPES[self.status]

    def detail(self) -> ErrorDetail:
        return ErrorDetail(
            type=self.type,
            message=self.message,
            param=self.param,
            code=self.code,
            details=self.details,
        )

    def envelope(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type,
            "message": self.message,
            "param": self.param,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}


class InvalidRequest(FusionError):
    status = 400
    default_code = ErrorCode.INVALID_REQUEST


class NotFound(FusionError):
    status = 404
    default_code = ErrorCode.NOT_FOUND


class Conflict(FusionError):
    status = 409
    default_code = ErrorCode.CONFLICT


class PayloadTooLarge(FusionError):
    status = 413
    default_code = ErrorCode.PAYLOAD_TOO_LARGE


class RateLimited(FusionError):
    status = 429
    default_code = ErrorCode.RATE_LIMIT_EXCEEDED


class QueueFull(RateLimited):
    default_code = ErrorCode.QUEUE_FULL


class ServiceUnavailable(FusionError):
    status = 503
    default_code = ErrorCode.SERVICE_UNAVAILABLE


class InsufficientMemory(ServiceUnavailable):
    default_code = ErrorCode.INSUFFICIENT_VRAM


class StorageError(FusionError):
    """The database could not be written (or read) because of the storage under it, not
    because of the request: engine.store raises the subclasses below."""


class InsufficientStorage(StorageError):
    status = 507
    default_code = ErrorCode.INSUFFICIENT_STORAGE


class RecordTooLarge(PayloadTooLarge, StorageError):
    """A record over the store's size limit for its kind: the work is answered, not kept."""

    default_code = ErrorCode.RECORD_TOO_LARGE


class StorageReadOnly(ServiceUnavailable, StorageError):
    default_code = ErrorCode.STORAGE_READ_ONLY


class StorageUnavailable(ServiceUnavailable, StorageError):
    default_code = ErrorCode.STORAGE_UNAVAILABLE


class StorageBusy(ServiceUnavailable, StorageError):
    default_code = ErrorCode.STORAGE_BUSY


class OperationTimeout(FusionError):
    status = 504
    default_code = ErrorCode.TIMEOUT


class InternalError(FusionError):
    pass
