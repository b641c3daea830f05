"""Domain errors. Each carries the spec's (§7) HTTP status, error type and code so the
server can render the envelope without knowing the error's origin."""

from __future__ import annotations

from typing import Any, ClassVar


class FusionError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.details = details
        self.headers = headers or {}

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
    type = "invalid_request_error"
    default_code = "invalid_request"


class NotFound(FusionError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"


class Conflict(FusionError):
    status = 409
    type = "conflict_error"
    default_code = "conflict"


class PayloadTooLarge(FusionError):
    status = 413
    type = "payload_too_large_error"
    default_code = "payload_too_large"


class RateLimited(FusionError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class QueueFull(RateLimited):
    default_code = "queue_full"


class ServiceUnavailable(FusionError):
    status = 503
    type = "service_unavailable_error"
    default_code = "service_unavailable"


class InsufficientMemory(ServiceUnavailable):
    default_code = "insufficient_vram"


class StorageError(FusionError):
    """The database could not be written (or read) because of the storage under it, not
    because of the request: engine.store raises the subclasses below."""


class InsufficientStorage(StorageError):
    # §7 has no row for 507; unlisted 5xx are internal_error (docs/decisions.md).
    status = 507
    type = "internal_error"
    default_code = "insufficient_storage"


class RecordTooLarge(PayloadTooLarge, StorageError):
    """A record over the store's size limit for its kind: the work is answered, not kept."""

    default_code = "record_too_large"


class StorageReadOnly(ServiceUnavailable, StorageError):
    default_code = "storage_read_only"


class StorageUnavailable(ServiceUnavailable, StorageError):
    default_code = "storage_unavailable"


class OperationTimeout(FusionError):
    status = 504
    type = "timeout_error"
    default_code = "timeout"


class InternalError(FusionError):
    pass
