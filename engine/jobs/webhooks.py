"""Webhooks for job events (spec §5.5-5.8): registrations, a transactional outbox of
deliveries, and the deliverer that POSTs them with retries.

Outbox
    `WebhookStore.record` joins the queue's transaction that changes a job's status
    (`queue.on_event(record=store.record)`): one `pending` delivery per active webhook
    subscribed to the event, and one for the job's `callback_url` when the event is
    terminal. So a delivery exists exactly when the change was committed, and it survives
    a restart as a row. The body is encoded once, there (compact JSON, UTF-8): every
    attempt sends the same bytes, and the delivery id stays the same across retries, so a
    receiver dedupes on it.

Signatures (only when the webhook, or the job for its callback_url, has a secret; without
one no signature header is sent)
    ``X-Webhook-Signature: sha256=<hex>``: HMAC-SHA256 with the secret's UTF-8 bytes as
    key over the exact body bytes (spec §5.8).

    Standard Webhooks (https://www.standardwebhooks.com/), so that receivers can reject
    replays: ``webhook-id`` (the delivery id), ``webhook-timestamp`` (integer epoch seconds
    of this attempt) and ``webhook-signature: v1,<base64 HMAC-SHA256>`` over
    ``{webhook-id}.{webhook-timestamp}.{body}``. Its key is the base64-decoded part after
    ``whsec_`` when the secret starts with ``whsec_`` (the scheme's own secrets), else the
    secret's UTF-8 bytes. The id and timestamp headers are sent with every delivery.

    Other headers: ``Content-Type: application/json``, ``X-Webhook-Event``,
    ``X-Webhook-ID`` (the webhook's id; ``callback`` for a job's callback_url),
    ``X-Webhook-Delivery`` (the delivery id), ``User-Agent: fusion-webhooks/1``.

Delivery
    A 2xx answer is success. Anything else fails the attempt: 3xx (redirects are not
    followed), 4xx, 5xx, the per-attempt deadline, a refused connection and a URL the SSRF
    guard refuses (engine.net). 410 Gone disables the webhook and cancels its pending
    deliveries. A failed attempt is retried after an exponential backoff with equal jitter,
    ``cap = min(backoff_max, base * 2**(attempt-1))``, delay in ``[cap/2, cap]``, or after
    the receiver's Retry-After when longer (capped at backoff_max), until
    `webhook_max_attempts`; then the delivery is `failed`. A webhook whose last
    `webhook_disable_after_failures` attempts (across deliveries) all failed is disabled.

    Every attempt is a `webhook_attempts` row, written in the same transaction as the
    delivery's new state; a webhook's success and failure counts are counted from those
    rows, so they always equal the log. A delivery being attempted is leased (its
    next_attempt_at moved past the attempt's deadline), so an attempt cut short by a crash
    or a stop() is simply made again once that lease (deadline + 30 s) has run out.
    A receiver's answer is read up to 64 KiB; a longer one fails the attempt.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import contextlib
import hashlib
import hmac
import json
import random as random_module
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import apsw
import httpx
import structlog

from engine.config import Settings
from engine.errors import Conflict, ErrorCode, FusionError, InvalidRequest, NotFound
from engine.jobs.types import JobEvent, JobEventName
from engine.net import FetchPolicy, fetch
from engine.store import Store, register_migration

log = structlog.get_logger(__name__)

MAX_URL_CHARS = 2048
MAX_SECRET_CHARS = 512
STANDARD_SECRET_PREFIX = "whsec_"
# A receiver's answer is only looked at for its status and headers.
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "fusion-webhooks/1"
CALLBACK_ID = "callback"
# How long past an attempt's deadline a delivery stays leased to it: only a crash of
# the process leaves the lease to expire.
LEASE_GRACE_S = 30.0

_TERMINAL_EVENTS = frozenset({JobEventName.COMPLETED, JobEventName.FAILED, JobEventName.CANCELLED})

register_migration(
    201,
    "webhooks",
    """
    CREATE TABLE webhooks (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        url TEXT NOT NULL,
        events TEXT NOT NULL CHECK (json_valid(events)),
        secret TEXT,
        metadata TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
        status TEXT NOT NULL CHECK (status IN ('active', 'disabled')),
        disabled_reason TEXT,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    ) STRICT;
    CREATE TABLE webhook_deliveries (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        webhook_id TEXT,
        url TEXT NOT NULL,
        secret TEXT,
        event TEXT NOT NULL,
        job_id TEXT NOT NULL,
        body TEXT NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('pending', 'delivered', 'failed', 'cancelled')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        last_status_code INTEGER,
        last_error TEXT,
        created_at REAL NOT NULL,
        finished_at REAL
    ) STRICT;
    CREATE INDEX webhook_deliveries_due
        ON webhook_deliveries (next_attempt_at, seq) WHERE status = 'pending';
    CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, status);
    CREATE INDEX webhook_deliveries_by_job ON webhook_deliveries (job_id);
    CREATE INDEX webhook_deliveries_finished
        ON webhook_deliveries (finished_at) WHERE finished_at IS NOT NULL;
    CREATE TABLE webhook_attempts (
        seq INTEGER PRIMARY KEY,
        delivery_id TEXT NOT NULL,
        webhook_id TEXT,
        attempt INTEGER NOT NULL,
        at REAL NOT NULL,
        status_code INTEGER,
        error TEXT,
        ok INTEGER NOT NULL CHECK (ok IN (0, 1)),
        duration_ms REAL NOT NULL
    ) STRICT;
    CREATE INDEX webhook_attempts_by_webhook ON webhook_attempts (webhook_id, ok, at);
    CREATE INDEX webhook_attempts_by_delivery ON webhook_attempts (delivery_id, attempt);
    """,
)


class WebhookStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Webhook:
    """A registration. `secret` is for signing only: never show it to a caller."""

    id: str
    url: str
    events: list[JobEventName]
    secret: str | None
    metadata: Any
    status: WebhookStatus
    disabled_reason: str | None
    consecutive_failures: int
    created_at: float


@dataclass(frozen=True)
class WebhookInfo:
    """A webhook with its delivery record (§5.6), counted from the attempts log."""

    webhook: Webhook
    last_triggered_at: float | None
    success_count: int
    failure_count: int


@dataclass(frozen=True)
class Delivery:
    """One event for one target. `webhook_id` is None for a job's callback_url."""

    id: str
    webhook_id: str | None
    url: str
    secret: str | None
    event: JobEventName
    job_id: str
    body: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: float | None
    last_status_code: int | None
    last_error: str | None
    created_at: float
    finished_at: float | None


@dataclass(frozen=True)
class Attempt:
    """One POST of a delivery, as logged."""

    delivery_id: str
    webhook_id: str | None
    attempt: int
    at: float
    status_code: int | None
    error: str | None
    ok: bool
    duration_ms: float


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to. `retry_after_s`: the receiver's Retry-After, if any."""

    ok: bool
    status_code: int | None = None
    error: str | None = None
    gone: bool = False
    retry_after_s: float | None = None


@dataclass(frozen=True)
class DeliveryPolicy:
    """The webhook_* settings (engine.config.Settings) the deliverer obeys."""

    timeout_s: float
    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float
    disable_after_failures: int
    max_concurrency: int
    allow_private_urls: bool

    def __post_init__(self) -> None:
        if (
            self.timeout_s <= 0
            or self.max_attempts < 1
            or self.backoff_base_s < 0
            or self.backoff_max_s < self.backoff_base_s
            or self.disable_after_failures < 1
            or self.max_concurrency < 1
        ):
            raise ValueError(f"invalid webhook delivery settings: {self}")

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryPolicy:
        return cls(
            timeout_s=settings.webhook_timeout_s,
            max_attempts=settings.webhook_max_attempts,
            backoff_base_s=settings.webhook_backoff_base_s,
            backoff_max_s=settings.webhook_backoff_max_s,
            disable_after_failures=settings.webhook_disable_after_failures,
            max_concurrency=settings.webhook_max_concurrency,
            allow_private_urls=settings.allow_private_urls,
        )

    @property
    def fetch(self) -> FetchPolicy:
        return FetchPolicy(
            allow_private=self.allow_private_urls,
            timeout_s=self.timeout_s,
            max_bytes=MAX_RESPONSE_BYTES,
        )

    def retry_delay(
        self, attempt: int, retry_after_s: float | None, rng: random_module.Random
    ) -> float:
        """Seconds before the attempt after failed attempt number `attempt` (from 1)."""
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** min(attempt - 1, 64))
        delay = cap / 2 + rng.uniform(0, cap / 2)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        return min(delay, self.backoff_max_s)


# -- signing ------------------------------------------------------------------------------


def check_secret(secret: Any, param: str = "secret") -> str | None:
    """`secret` if it can sign deliveries (None stays None); 400 naming `param` if not.
    Use it for a job's callback_secret too."""
    if secret is None:
        return None
    if (
        not isinstance(secret, str)
        or not 1 <= len(secret) <= MAX_SECRET_CHARS
        or not secret.isprintable()
    ):
        raise InvalidRequest(
            f"a secret must be a string of 1 to {MAX_SECRET_CHARS} printable characters",
            param=param,
        )
    if secret.startswith(STANDARD_SECRET_PREFIX):
        try:
            signing_key(secret)
        except ValueError:
            raise InvalidRequest(
                f"a secret starting with '{STANDARD_SECRET_PREFIX}' must continue in base64 "
                "(a Standard Webhooks secret)",
                param=param,
            ) from None
    return secret


def signing_key(secret: str) -> bytes:
    """The Standard Webhooks HMAC key of `secret` (see the module doc)."""
    if secret.startswith(STANDARD_SECRET_PREFIX):
        try:
            return base64.b64decode(secret.removeprefix(STANDARD_SECRET_PREFIX), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"not base64 after '{STANDARD_SECRET_PREFIX}': {exc}") from None
    return secret.encode("utf-8")


def spec_signature(secret: str, body: bytes) -> str:
    """The X-Webhook-Signature value: ``sha256=<hex HMAC-SHA256(secret, body)>``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def standard_signature(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature value: ``v1,<base64 HMAC-SHA256(key, id.timestamp.body)>``."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def delivery_headers(delivery: Delivery, body: bytes, timestamp: int) -> dict[str, str]:
    """Every header of one attempt of `delivery` at `timestamp` (epoch seconds)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Webhook-Event": delivery.event.value,
        "X-Webhook-ID": delivery.webhook_id or CALLBACK_ID,
        "X-Webhook-Delivery": delivery.id,
        "webhook-id": delivery.id,
        "webhook-timestamp": str(timestamp),
    }
    if delivery.secret is not None:
        headers["X-Webhook-Signature"] = spec_signature(delivery.secret, body)
        headers["webhook-signature"] = standard_signature(
            delivery.secret, delivery.id, timestamp, body
        )
    return headers


def retry_after_s(value: str | None, now: float) -> float | None:
    """A Retry-After header (delay seconds or an HTTP date) as seconds from `now`; None
    when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # an HTTP date is GMT; the obsolete forms may lack a zone
        return None
    return max(0.0, moment.timestamp() - now)


# -- the store ----------------------------------------------------------------------------

_WEBHOOK_COLUMNS = (
    "id, url, events, secret, metadata, status, disabled_reason, consecutive_failures, created_at"
)
_DELIVERY_COLUMNS = (
    "id, webhook_id, url, secret, event, job_id, body, status, attempts, next_attempt_at, "
    "last_status_code, last_error, created_at, finished_at"
)
_ATTEMPT_COLUMNS = "delivery_id, webhook_id, attempt, at, status_code, error, ok, duration_ms"


class WebhookStore:
    """Webhooks and their deliveries in `store`. Synchronous: call it from a worker thread
    in async code (record() runs in the queue's transaction, wherever that is).
    `clock`: epoch seconds, injectable so tests decide time."""

    def __init__(
        self,
        store: Store,
        *,
        metadata_max_bytes: int = 16_384,
        max_webhooks: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._metadata_max_bytes = metadata_max_bytes
        # Every job event writes a delivery per subscribed webhook: the count bounds that.
        self._max_webhooks = max_webhooks
        self._clock = clock

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def register(self, url: Any, events: Any, secret: Any = None, metadata: Any = None) -> Webhook:
        """A new active webhook (400 invalid_request naming the bad field)."""
        checked_url = check_url(url)
        names = _check_events(events)
        checked_secret = check_secret(secret)
        metadata_json = check_metadata(metadata, self._metadata_max_bytes)
        with self._store.transaction() as conn:
            registered = int(conn.execute("SELECT count(*) FROM webhooks").fetchall()[0][0] or 0)
            if registered >= self._max_webhooks:
                raise Conflict(
                    f"{registered} webhooks are registered, the most there may be (setting "
                    "webhook_max_count); delete one first",
                    param="url",
                )
            (row,) = conn.execute(
                "INSERT INTO webhooks (id, url, events, secret, metadata, status, created_at) "
                f"VALUES (?, ?, ?, ?, ?, 'active', ?) RETURNING {_WEBHOOK_COLUMNS}",
                (
                    f"wh-{uuid.uuid4().hex}",
                    checked_url,
                    json.dumps([n.value for n in names]),
                    checked_secret,
                    metadata_json,
                    self._clock(),
                ),
            ).fetchall()
        return _webhook(row)

    def get(self, webhook_id: str) -> Webhook:
        """The webhook, or NotFound (webhook_not_found)."""
        rows = self._store.query(
            f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE id = ?", (webhook_id,)
        )
        if not rows:
            raise _not_found(webhook_id)
        return _webhook(rows[0])

    def list(self) -> list[WebhookInfo]:
        """Every webhook, oldest first, with counts from the attempts log."""
        webhooks = [
            _webhook(row)
            for row in self._store.query(f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks ORDER BY seq")
        ]
        counts = {
            webhook_id: (last, int(ok or 0), int(failed or 0))
            for webhook_id, last, ok, failed in self._store.query(
                "SELECT webhook_id, max(at), sum(ok), sum(1 - ok) FROM webhook_attempts "
                "WHERE webhook_id IS NOT NULL GROUP BY webhook_id"
            )
        }
        infos = []
        for webhook in webhooks:
            last, ok, failed = counts.get(webhook.id, (None, 0, 0))
            infos.append(WebhookInfo(webhook, last, ok, failed))
        return infos

    def delete(self, webhook_id: str) -> None:
        """Remove the webhook and cancel its pending deliveries (NotFound if unknown).
        Its attempts stay in the log."""
        with self._store.transaction() as conn:
            deleted = conn.execute(
                "DELETE FROM webhooks WHERE id = ? RETURNING id", (webhook_id,)
            ).fetchall()
            if not deleted:
                raise _not_found(webhook_id)
            _cancel_pending(conn, webhook_id, self._clock())

    def record(self, conn: apsw.Connection, event: JobEvent) -> None:
        """The outbox: queue `event`'s deliveries in the caller's open transaction."""
        rows = conn.execute(
            "SELECT id, url, secret FROM webhooks WHERE status = 'active' "
            "AND EXISTS (SELECT 1 FROM json_each(webhooks.events) WHERE value = ?) "
            "ORDER BY seq",
            (event.name.value,),
        ).fetchall()
        targets: builtins.list[tuple[str | None, str, str | None]] = [
            (str(webhook_id), str(url), None if secret is None else str(secret))
            for webhook_id, url, secret in rows
        ]
        if event.name in _TERMINAL_EVENTS and event.job.callback_url is not None:
            targets.append((None, event.job.callback_url, event.job.callback_secret))
        if not targets:
            return
        body = json.dumps(event.payload, separators=(",", ":"), ensure_ascii=False)
        now = self._clock()
        conn.executemany(
            "INSERT INTO webhook_deliveries (id, webhook_id, url, secret, event, job_id, body, "
            "status, next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
            [
                (
                    f"dlv-{uuid.uuid4().hex}",
                    webhook_id,
                    url,
                    secret,
                    event.name.value,
                    event.job.id,
                    body,
                    now,
                    now,
                )
                for webhook_id, url, secret in targets
            ],
        )

    def deliveries(
        self, *, webhook_id: str | None = None, job_id: str | None = None
    ) -> builtins.list[Delivery]:
        """Deliveries, oldest first, of one webhook and/or one job (all when neither)."""
        where, bindings = _filters(webhook_id=webhook_id, job_id=job_id)
        rows = self._store.query(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries {where} ORDER BY seq", bindings
        )
        return [_delivery(row) for row in rows]

    def attempts(
        self, *, webhook_id: str | None = None, delivery_id: str | None = None
    ) -> builtins.list[Attempt]:
        """The delivery log, oldest first, of one webhook and/or one delivery."""
        where, bindings = _filters(webhook_id=webhook_id, delivery_id=delivery_id)
        rows = self._store.query(
            f"SELECT {_ATTEMPT_COLUMNS} FROM webhook_attempts {where} ORDER BY seq", bindings
        )
        return [
            Attempt(did, wid, n, at, code, error, bool(ok), ms)
            for did, wid, n, at, code, error, ok, ms in rows
        ]

    def delivery_counts(self) -> dict[str, int]:
        """Deliveries kept (finished ones go with their job's purge) by status, every status
        present."""
        rows = self._store.query("SELECT status, count(*) FROM webhook_deliveries GROUP BY status")
        found = {str(status): int(n) for status, n in rows}
        return {status.value: found.get(status.value, 0) for status in DeliveryStatus}

    def purge(self, conn: apsw.Connection, cutoff: float) -> int:
        """Delete deliveries finished before `cutoff` (epoch seconds) and their attempts,
        in the caller's transaction: the job queue's purge hook, so deliveries follow the
        jobs' retention and the counts of list() cover the log that is kept. Returns how
        many deliveries."""
        rows = conn.execute(
            "DELETE FROM webhook_deliveries INDEXED BY webhook_deliveries_finished "
            "WHERE finished_at IS NOT NULL AND finished_at < ? RETURNING id",
            (cutoff,),
        ).fetchall()
        conn.executemany("DELETE FROM webhook_attempts WHERE delivery_id = ?", rows)
        return len(rows)

    def claim_due(self, limit: int, lease_s: float) -> builtins.list[Delivery]:
        """Up to `limit` pending deliveries due now, leased for `lease_s` seconds."""
        with self._store.transaction() as conn:
            now = self._clock()
            rows = conn.execute(
                "UPDATE webhook_deliveries SET next_attempt_at = ? WHERE seq IN ("
                "SELECT seq FROM webhook_deliveries INDEXED BY webhook_deliveries_due "
                "WHERE status = 'pending' AND next_attempt_at <= ? "
                f"ORDER BY next_attempt_at, seq LIMIT ?) RETURNING {_DELIVERY_COLUMNS}",
                (now + lease_s, now, limit),
            ).fetchall()
        return sorted((_delivery(row) for row in rows), key=lambda d: d.created_at)

    def next_due_at(self) -> float | None:
        """When the earliest pending delivery is due (None: nothing pending)."""
        ((at,),) = self._store.query(
            "SELECT min(next_attempt_at) FROM webhook_deliveries INDEXED BY "
            "webhook_deliveries_due WHERE status = 'pending'"
        )
        return None if at is None else float(at)

    def settle(
        self,
        delivery: Delivery,
        outcome: Outcome,
        *,
        at: float,
        duration_ms: float,
        retry_in_s: float,
        policy: DeliveryPolicy,
    ) -> DeliveryStatus:
        """Log an attempt made at `at` and move its delivery on, in one transaction; the
        delivery's new status. `retry_in_s`: the delay before the next attempt if any."""
        with self._store.transaction() as conn:
            now = self._clock()
            ((attempts_before,),) = conn.execute(
                "SELECT attempts FROM webhook_deliveries WHERE id = ?", (delivery.id,)
            ).fetchall()
            attempt = int(attempts_before or 0) + 1
            conn.execute(
                f"INSERT INTO webhook_attempts ({_ATTEMPT_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    delivery.id,
                    delivery.webhook_id,
                    attempt,
                    at,
                    outcome.status_code,
                    outcome.error,
                    int(outcome.ok),
                    duration_ms,
                ),
            )
            disabled: str | None = None
            if outcome.ok:
                status = DeliveryStatus.DELIVERED
            elif outcome.gone or attempt >= policy.max_attempts:
                status = DeliveryStatus.FAILED
            else:
                status = DeliveryStatus.PENDING
            if delivery.webhook_id is not None:
                disabled = self._count(conn, delivery.webhook_id, outcome, policy)
                if disabled is not None and status is DeliveryStatus.PENDING:
                    status = DeliveryStatus.FAILED
            # A delivery cancelled meanwhile (webhook deleted) stays cancelled.
            conn.execute(
                "UPDATE webhook_deliveries SET status = ?, attempts = ?, next_attempt_at = ?, "
                "last_status_code = ?, last_error = ?, finished_at = ? "
                "WHERE id = ? AND status = 'pending'",
                (
                    status.value,
                    attempt,
                    now + retry_in_s if status is DeliveryStatus.PENDING else None,
                    outcome.status_code,
                    outcome.error,
                    None if status is DeliveryStatus.PENDING else now,
                    delivery.id,
                ),
            )
            if disabled is not None and delivery.webhook_id is not None:
                _cancel_pending(conn, delivery.webhook_id, now)
        if disabled is not None:
            log.warning("webhook_disabled", webhook_id=delivery.webhook_id, reason=disabled)
        return status

    def _count(
        self, conn: apsw.Connection, webhook_id: str, outcome: Outcome, policy: DeliveryPolicy
    ) -> str | None:
        """Update the webhook's run of failures; the reason when this attempt disables it."""
        rows = conn.execute(
            "UPDATE webhooks SET consecutive_failures = "
            "CASE WHEN ? THEN 0 ELSE consecutive_failures + 1 END "
            "WHERE id = ? AND status = 'active' RETURNING consecutive_failures",
            (int(outcome.ok), webhook_id),
        ).fetchall()
        if not rows:
            return None
        failures = int(rows[0][0] or 0)
        if outcome.gone:
            reason = "the receiver answered 410 Gone"
        elif failures >= policy.disable_after_failures:
            reason = f"{failures} consecutive failed delivery attempts"
        else:
            return None
        conn.execute(
            "UPDATE webhooks SET status = 'disabled', disabled_reason = ? WHERE id = ?",
            (reason, webhook_id),
        )
        return reason


def check_url(url: Any, param: str = "url") -> str:
    """`url` if deliveries can be POSTed to it; 400 naming `param` if not. Use it for a
    job's callback_url too. Where it points is checked when connecting (engine.net)."""
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"{param} must be a non-empty string", param=param)
    if len(url) > MAX_URL_CHARS:
        raise InvalidRequest(f"{param} must be at most {MAX_URL_CHARS} characters", param=param)
    if not url.isprintable() or any(c.isspace() for c in url):
        raise InvalidRequest(f"{param} must not contain spaces or control characters", param=param)
    try:
        parts = urlsplit(url)
        # .port raises ValueError for a port out of range.
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise InvalidRequest(f"{param} is not a valid URL: {exc}", param=param) from None
    if not usable:
        raise InvalidRequest(
            f"{param} must be an http or https URL with a host, not '{url}'", param=param
        )
    return url


def check_metadata(metadata: Any, max_bytes: int, param: str = "metadata") -> str | None:
    """`metadata` (an object, or None) as JSON, if it is at most `max_bytes` (setting
    jobs_metadata_max_bytes) encoded; 400 naming `param` if not. For jobs and webhooks."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequest(f"{param} must be an object", param=param)
    encoded = json.dumps(metadata, ensure_ascii=False)
    size = len(encoded.encode("utf-8"))
    if size > max_bytes:
        raise InvalidRequest(
            f"{param} is {size} bytes of JSON; the limit is {max_bytes} "
            "(setting jobs_metadata_max_bytes)",
            param=param,
            code=ErrorCode.METADATA_TOO_LARGE,
        )
    return encoded


def _check_events(events: Any) -> list[JobEventName]:
    valid = ", ".join(name.value for name in JobEventName)
    if not isinstance(events, list) or not events:
        raise InvalidRequest(
            f"events must be a non-empty list of event names: {valid}", param="events"
        )
    names: list[JobEventName] = []
    for index, value in enumerate(events):
        try:
            name = JobEventName(value)
        except ValueError:
            raise InvalidRequest(
                f"unknown event {value!r}; events are: {valid}", param=f"events[{index}]"
            ) from None
        if name not in names:
            names.append(name)
    return names


def _not_found(webhook_id: str) -> NotFound:
    return NotFound(
        f"no webhook {webhook_id}", param="webhook_id", code=ErrorCode.WEBHOOK_NOT_FOUND
    )


def _cancel_pending(conn: apsw.Connection, webhook_id: str, now: float) -> None:
    conn.execute(
        "UPDATE webhook_deliveries SET status = 'cancelled', next_attempt_at = NULL, "
        "finished_at = ? WHERE webhook_id = ? AND status = 'pending'",
        (now, webhook_id),
    )


def _filters(**equal: str | None) -> tuple[str, list[str]]:
    named = {column: value for column, value in equal.items() if value is not None}
    if not named:
        return "", []
    return "WHERE " + " AND ".join(f"{column} = ?" for column in named), list(named.values())


def _webhook(row: Sequence[Any]) -> Webhook:
    (webhook_id, url, events, secret, metadata, status, reason, failures, created_at) = row
    return Webhook(
        id=webhook_id,
        url=url,
        events=[JobEventName(name) for name in json.loads(events)],
        secret=secret,
        metadata=None if metadata is None else json.loads(metadata),
        status=WebhookStatus(status),
        disabled_reason=reason,
        consecutive_failures=failures,
        created_at=created_at,
    )


def _delivery(row: Sequence[Any]) -> Delivery:
    (
        delivery_id,
        webhook_id,
        url,
        secret,
        event,
        job_id,
        body,
        status,
        attempts,
        next_attempt_at,
        last_status_code,
        last_error,
        created_at,
        finished_at,
    ) = row
    return Delivery(
        id=delivery_id,
        webhook_id=webhook_id,
        url=url,
        secret=secret,
        event=JobEventName(event),
        job_id=job_id,
        body=body,
        status=DeliveryStatus(status),
        attempts=attempts,
        next_attempt_at=next_attempt_at,
        last_status_code=last_status_code,
        last_error=last_error,
        created_at=created_at,
        finished_at=finished_at,
    )


# -- the deliverer ------------------------------------------------------------------------


class Deliverer:
    """POSTs due deliveries of `store`, at most `policy.max_concurrency` at once, and
    sleeps until the earliest next attempt or a wake(). `clock` (epoch seconds) and
    `random` (the jitter) are injectable; the clock defaults to the store's."""

    def __init__(
        self,
        store: WebhookStore,
        policy: DeliveryPolicy,
        *,
        clock: Callable[[], float] | None = None,
        random: random_module.Random | None = None,
    ) -> None:
        self._store = store
        self._policy = policy
        self._clock = clock or store.clock
        self._random = random or random_module.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        # Outcomes being written: stop() lets them finish, so none writes to a closed store.
        self._settling: set[asyncio.Future[DeliveryStatus]] = set()

    async def start(self) -> None:
        """Resume delivering what is pending, on the running loop."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="webhook-deliverer")
        self._task.add_done_callback(_report_crash)

    async def stop(self) -> None:
        """Stop delivering; attempts in flight are abandoned (retried after a restart)."""
        task, self._task, self._loop = self._task, None, None
        tasks = [t for t in (task, *self._in_flight) if t is not None]
        for running in tasks:
            running.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._settling, return_exceptions=True)
        self._in_flight.clear()

    def wake(self) -> None:
        """Look for due deliveries now. Safe from any thread."""
        loop = self._loop
        if loop is None:
            return
        # RuntimeError: the loop closed meanwhile, so nothing is left to wake.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._wakeup.set)

    async def _run(self) -> None:
        lease_s = self._policy.timeout_s + LEASE_GRACE_S
        while True:
            self._wakeup.clear()
            free = self._policy.max_concurrency - len(self._in_flight)
            timeout: float | None = None
            if free > 0:
                try:
                    due = await asyncio.to_thread(self._store.claim_due, free, lease_s)
                    for delivery in due:
                        task = asyncio.create_task(self._attempt(delivery))
                        self._in_flight.add(task)
                        task.add_done_callback(self._finished)
                    if len(due) == free:
                        continue
                    next_at = await asyncio.to_thread(self._store.next_due_at)
                except (FusionError, apsw.Error) as exc:  # full, read-only, gone or busy
                    log.warning("webhook_store_unavailable", error=str(exc))
                    next_at = self._clock() + self._policy.timeout_s
                if next_at is not None:
                    timeout = max(0.0, next_at - self._clock())
            # Not wait_for: on Python 3.11 it can swallow a cancellation (stop()) that
            # arrives as the event is set, and this loop would then outlive stop().
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        _report_crash(task)
        self._wakeup.set()

    async def _attempt(self, delivery: Delivery) -> None:
        at = self._clock()
        started = time.perf_counter()
        outcome = await self._post(delivery, at)
        duration_ms = (time.perf_counter() - started) * 1000
        retry_in_s = (
            0.0
            if outcome.ok
            else self._policy.retry_delay(
                delivery.attempts + 1, outcome.retry_after_s, self._random
            )
        )
        settling = asyncio.ensure_future(
            asyncio.to_thread(
                self._store.settle,
                delivery,
                outcome,
                at=at,
                duration_ms=duration_ms,
                retry_in_s=retry_in_s,
                policy=self._policy,
            )
        )
        self._settling.add(settling)
        settling.add_done_callback(self._settling.discard)
        try:
            status = await asyncio.shield(settling)
        except (FusionError, apsw.Error) as exc:  # the lease runs out: the attempt is redone
            log.warning("webhook_attempt_not_logged", delivery_id=delivery.id, error=str(exc))
            return
        log.info(
            "webhook_attempt",
            delivery_id=delivery.id,
            webhook_id=delivery.webhook_id,
            job_event=delivery.event.value,
            ok=outcome.ok,
            status_code=outcome.status_code,
            error=outcome.error,
            delivery_status=status.value,
        )

    async def _post(self, delivery: Delivery, at: float) -> Outcome:
        body = delivery.body.encode("utf-8")
        try:
            headers = delivery_headers(delivery, body, int(at))
            answer = await fetch(
                delivery.url,
                self._policy.fetch,
                method="POST",
                headers=headers,
                content=body,
                max_redirects=0,
            )
        except FusionError as exc:  # refused by the SSRF guard, unreachable, too slow
            return Outcome(ok=False, error=f"{exc.code}: {exc.message}")
        except (ValueError, httpx.InvalidURL) as exc:  # a callback_url or secret not checked
            return Outcome(ok=False, error=f"cannot send the delivery: {exc}")
        code = answer.status_code
        if 200 <= code < 300:
            return Outcome(ok=True, status_code=code)
        if 300 <= code < 400:
            location = answer.headers.get("location", "")
            error = f"HTTP {code}: redirects are not followed (Location: {location!r})"
        else:
            error = f"HTTP {code}"
        return Outcome(
            ok=False,
            status_code=code,
            error=error,
            gone=code == 410,
            retry_after_s=retry_after_s(answer.headers.get("retry-after"), self._clock()),
        )


def _report_crash(task: asyncio.Task[None]) -> None:
    # A bug, not a delivery's failure: the delivery stays leased and is tried again.
    if not task.cancelled() and task.exception() is not None:
        log.error("webhook_task_crashed", task=task.get_name(), exc_info=task.exception())
