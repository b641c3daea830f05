"""Domain errors. Each carries the spec's (§7) HTTP status, error type and code so the
server can render the envelope without knowing the error's origin.

Every code the server answers is an ErrorCode, and ERROR_STATUS fixes the one HTTP status
each code goes with (the error type follows from the status, ERROR_TYPES): an error class
refuses a code of another status, so one code never reaches a client with two statuses.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class ErrorCode(StrEnum):
    """Every `code` of an error envelope: §7's and ours. A StrEnum, so the JSON is the
    plain string. Grouped by status; ERROR_STATUS is the authority."""

    # 400
    INVALID_REQUEST = "invalid_request"
    INVALID_INPUT = "invalid_input"
    INVALID_WORKFLOW = "invalid_workflow"
    INVALID_CAPABILITY = "invalid_capability"
    INVALID_COLLECTION = "invalid_collection"
    INVALID_DOCUMENT = "invalid_document"
    INVALID_VECTOR = "invalid_vector"
    INVALID_IMAGE = "invalid_image"
    INVALID_LANGUAGE = "invalid_language"
    INVALID_LOGIT_BIAS = "invalid_logit_bias"
    INVALID_MODEL_ID = "invalid_model_id"
    INVALID_MODEL_PATH = "invalid_model_path"
    INVALID_MODEL_TYPE = "invalid_model_type"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    PROMPT_TOO_LONG = "prompt_too_long"
    DIMENSION_MISMATCH = "dimension_mismatch"
    DIMENSIONS_NOT_SUPPORTED = "dimensions_not_supported"
    EMBEDDING_MODEL_MISMATCH = "embedding_model_mismatch"
    EMPTY_AUDIO = "empty_audio"
    UNSUPPORTED_AUDIO = "unsupported_audio"
    IMAGES_NOT_SUPPORTED = "images_not_supported"
    JSON_TOO_DEEP = "json_too_deep"
    METADATA_TOO_DEEP = "metadata_too_deep"
    METADATA_TOO_LARGE = "metadata_too_large"
    WRONG_MODEL_TYPE = "wrong_model_type"
    MODEL_UNAVAILABLE_OFFLINE = "model_unavailable_offline"
    UNKNOWN_FIELD = "unknown_field"
    UNSUPPORTED = "unsupported"
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    UNSUPPORTED_FORMAT = "unsupported_format"
    UNSUPPORTED_PARAMETER = "unsupported_parameter"
    URL_NOT_ALLOWED = "url_not_allowed"
    URL_TIMEOUT = "url_timeout"
    URL_UNREACHABLE = "url_unreachable"
    # 401, 403
    AUTHENTICATION_FAILED = "authentication_failed"
    PERMISSION_DENIED = "permission_denied"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    # 404
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    RUN_NOT_FOUND = "run_not_found"
    COLLECTION_NOT_FOUND = "collection_not_found"
    DOCUMENT_NOT_FOUND = "document_not_found"
    JOB_NOT_FOUND = "job_not_found"
    # 405
    METHOD_NOT_ALLOWED = "method_not_allowed"
    # 409
    CONFLICT = "conflict"
    MODEL_ALREADY_LOADED = "model_already_loaded"
    MODEL_IN_USE = "model_in_use"
    WORKFLOW_EXISTS = "workflow_exists"
    WORKFLOW_IN_USE = "workflow_in_use"
    WORKFLOW_PREDEFINED = "workflow_predefined"
    # 413
    PAYLOAD_TOO_LARGE = "payload_too_large"
    DOCUMENT_TOO_LARGE = "document_too_large"
    RECORD_TOO_LARGE = "record_too_large"
    # 415, 421
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    HOST_NOT_ALLOWED = "host_not_allowed"
    # 429
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    QUEUE_FULL = "queue_full"
    # 500
    INTERNAL_ERROR = "internal_error"
    # 503
    SERVICE_UNAVAILABLE = "service_unavailable"
    MODEL_NOT_LOADED = "model_not_loaded"
    MODEL_UNLOADED = "model_unloaded"
    INSUFFICIENT_VRAM = "insufficient_vram"
    ENGINE_NOT_RUNNING = "engine_not_running"
    SHUTTING_DOWN = "shutting_down"
    STORAGE_READ_ONLY = "storage_read_only"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    # 504
    TIMEOUT = "timeout"
    # 507
    INSUFFICIENT_STORAGE = "insufficient_storage"


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

_BY_STATUS: dict[int, tuple[ErrorCode, ...]] = {
    400: (
        ErrorCode.INVALID_REQUEST,
        ErrorCode.INVALID_INPUT,
        ErrorCode.INVALID_WORKFLOW,
        ErrorCode.INVALID_CAPABILITY,
        ErrorCode.INVALID_COLLECTION,
        ErrorCode.INVALID_DOCUMENT,
        ErrorCode.INVALID_VECTOR,
        ErrorCode.INVALID_IMAGE,
        ErrorCode.INVALID_LANGUAGE,
        ErrorCode.INVALID_LOGIT_BIAS,
        ErrorCode.INVALID_MODEL_ID,
        ErrorCode.INVALID_MODEL_PATH,
        ErrorCode.INVALID_MODEL_TYPE,
        ErrorCode.BACKEND_UNAVAILABLE,
        ErrorCode.CONTEXT_LENGTH_EXCEEDED,
        ErrorCode.PROMPT_TOO_LONG,
        ErrorCode.DIMENSION_MISMATCH,
        ErrorCode.DIMENSIONS_NOT_SUPPORTED,
        ErrorCode.EMBEDDING_MODEL_MISMATCH,
        ErrorCode.EMPTY_AUDIO,
        ErrorCode.UNSUPPORTED_AUDIO,
        ErrorCode.IMAGES_NOT_SUPPORTED,
        ErrorCode.JSON_TOO_DEEP,
        ErrorCode.METADATA_TOO_DEEP,
        ErrorCode.METADATA_TOO_LARGE,
        ErrorCode.WRONG_MODEL_TYPE,
        ErrorCode.MODEL_UNAVAILABLE_OFFLINE,
        ErrorCode.UNKNOWN_FIELD,
        ErrorCode.UNSUPPORTED,
        ErrorCode.UNSUPPORTED_CONTENT_TYPE,
        ErrorCode.UNSUPPORTED_FORMAT,
        ErrorCode.UNSUPPORTED_PARAMETER,
        ErrorCode.URL_NOT_ALLOWED,
        ErrorCode.URL_TIMEOUT,
        ErrorCode.URL_UNREACHABLE,
    ),
    401: (ErrorCode.AUTHENTICATION_FAILED,),
    403: (ErrorCode.PERMISSION_DENIED, ErrorCode.ORIGIN_NOT_ALLOWED),
    404: (
        ErrorCode.NOT_FOUND,
        ErrorCode.MODEL_NOT_FOUND,
        ErrorCode.RUN_NOT_FOUND,
        ErrorCode.COLLECTION_NOT_FOUND,
        ErrorCode.DOCUMENT_NOT_FOUND,
        ErrorCode.JOB_NOT_FOUND,
    ),
    405: (ErrorCode.METHOD_NOT_ALLOWED,),
    409: (
        ErrorCode.CONFLICT,
        ErrorCode.MODEL_ALREADY_LOADED,
        ErrorCode.MODEL_IN_USE,
        ErrorCode.WORKFLOW_EXISTS,
        ErrorCode.WORKFLOW_IN_USE,
        ErrorCode.WORKFLOW_PREDEFINED,
    ),
    413: (ErrorCode.PAYLOAD_TOO_LARGE, ErrorCode.DOCUMENT_TOO_LARGE, ErrorCode.RECORD_TOO_LARGE),
    415: (ErrorCode.UNSUPPORTED_MEDIA_TYPE,),
    421: (ErrorCode.HOST_NOT_ALLOWED,),
    429: (ErrorCode.RATE_LIMIT_EXCEEDED, ErrorCode.QUEUE_FULL),
    500: (ErrorCode.INTERNAL_ERROR,),
    503: (
        ErrorCode.SERVICE_UNAVAILABLE,
        ErrorCode.MODEL_NOT_LOADED,
        ErrorCode.MODEL_UNLOADED,
        ErrorCode.INSUFFICIENT_VRAM,
        ErrorCode.ENGINE_NOT_RUNNING,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.STORAGE_READ_ONLY,
        ErrorCode.STORAGE_UNAVAILABLE,
    ),
    504: (ErrorCode.TIMEOUT,),
    507: (ErrorCode.INSUFFICIENT_STORAGE,),
}

# Each code's one HTTP status. Its error type is ERROR_TYPES[status].
ERROR_STATUS: dict[ErrorCode, int] = {
    code: status for status, codes in _BY_STATUS.items() for code in codes
}

# Spec §7 gives `invalid_workflow` for "Workflow ID not found or invalid": an unknown
# workflow id is its 404, an invalid definition its 400 (docs/decisions.md). The only code
# with a second status.
_ALSO: dict[ErrorCode, int] = {ErrorCode.INVALID_WORKFLOW: 404}


def status_allows(code: ErrorCode, status: int) -> bool:
    """Whether ``code`` may be answered with ``status``."""
    return ERROR_STATUS[code] == status or _ALSO.get(code) == status


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


class OperationTimeout(FusionError):
    status = 504
    default_code = ErrorCode.TIMEOUT


class InternalError(FusionError):
    pass
