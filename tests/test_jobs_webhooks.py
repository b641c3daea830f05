"""engine.jobs.webhooks on real SQLite files, a real SqliteJobQueue producing the events,
and real HTTP receivers on loopback recording what arrives. Signatures are checked with
hmac/hashlib here, not with the module's own functions. Retries run with tiny backoffs,
or an injected clock that the test moves."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from manual_clock import Clock
from webhook_receiver import STALL, WAIT_S, Receiver, serve_receiver

from engine.config import Settings
from engine.errors import Conflict, ErrorCode, InvalidRequest, NotFound
from engine.jobs.queue import SqliteJobQueue
from engine.jobs.types import Job, JobEventName, JobRequest
from engine.jobs.webhooks import (
    Deliverer,
    DeliveryPolicy,
    DeliveryStatus,
    Outcome,
    WebhookStatus,
    WebhookStore,
    retry_after_s,
)
from engine.net import FetchPolicy, fetch
from engine.store import Store

T = TypeVar("T")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as running:
        yield running


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "jobs.sqlite3") as opened:
        yield opened


@pytest.fixture
def webhooks(store: Store, clock: Clock) -> WebhookStore:
    return WebhookStore(store, clock=clock)


@pytest.fixture
def queue(store: Store, webhooks: WebhookStore, clock: Clock) -> SqliteJobQueue:
    queue = SqliteJobQueue(store, clock=clock)
    queue.on_event(record=webhooks.record)
    return queue


def _policy(**settings: Any) -> DeliveryPolicy:
    defaults: dict[str, Any] = {
        "allow_private_urls": True,
        "webhook_timeout_s": 5.0,
        "webhook_max_attempts": 3,
        "webhook_backoff_base_s": 0.01,
        "webhook_backoff_max_s": 0.05,
    }
    return DeliveryPolicy.from_settings(Settings(**{**defaults, **settings}))


@asynccontextmanager
async def delivering(
    webhooks: WebhookStore, queue: SqliteJobQueue, policy: DeliveryPolicy
) -> AsyncIterator[Deliverer]:
    deliverer = Deliverer(webhooks, policy, random=random.Random(7))
    queue.on_event(observe=lambda _events: deliverer.wake())
    await deliverer.start()
    try:
        yield deliverer
    finally:
        await deliverer.stop()


async def until(check: Callable[[], T], what: str) -> T:
    """Poll `check` until it answers something true, for at most WAIT_S seconds."""
    deadline = time.monotonic() + WAIT_S
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _settled(webhooks: WebhookStore, count: int) -> Callable[[], bool]:
    """`count` deliveries exist and none is pending."""

    def check() -> bool:
        found = webhooks.deliveries()
        return len(found) == count and all(d.status != DeliveryStatus.PENDING for d in found)

    return check


def _submit(queue: SqliteJobQueue, **request: Any) -> Job:
    return queue.submit(JobRequest(operation="chat", input={"messages": ["hi"]}, **request)).job


def _complete(queue: SqliteJobQueue, job: Job) -> None:
    claimed = queue.claim("worker-1", 30.0)
    assert claimed is not None
    assert claimed.id == job.id
    assert queue.finish(job.id, claimed.lease_token, result={"content": "ok"})


def _hex_hmac(key: bytes, message: bytes) -> str:
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _standard(key: bytes, headers: dict[str, str], body: bytes) -> str:
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


# -- registrations ---------------------------------------------------------------------------


def test_the_number_of_webhooks_is_bounded(store: Store) -> None:
    webhooks = WebhookStore(store, max_webhooks=2)
    first = webhooks.register("https://example.com/a", ["job.completed"])
    webhooks.register("https://example.com/b", ["job.completed"])
    with pytest.raises(Conflict) as caught:
        webhooks.register("https://example.com/c", ["job.completed"])
    assert "webhook_max_count" in caught.value.message
    assert len(webhooks.list()) == 2
    webhooks.delete(first.id)
    webhooks.register("https://example.com/c", ["job.completed"])


def test_register_list_get_and_delete(webhooks: WebhookStore, clock: Clock) -> None:
    hook = webhooks.register(
        "https://tier2.example.com/webhooks/job-complete",
        ["job.completed", "job.failed", "job.completed"],
        secret="webhook-secret-123",
        metadata={"description": "Tier 2"},
    )
    assert hook.id.startswith("wh-")
    assert hook.events == [JobEventName.COMPLETED, JobEventName.FAILED]
    assert hook.status is WebhookStatus.ACTIVE
    assert hook.created_at == clock.now
    assert webhooks.get(hook.id) == hook
    (info,) = webhooks.list()
    assert info.webhook == hook
    assert (info.last_triggered_at, info.success_count, info.failure_count) == (None, 0, 0)

    webhooks.delete(hook.id)
    assert webhooks.list() == []
    for call in (webhooks.delete, webhooks.get):
        with pytest.raises(NotFound) as info_:
            call(hook.id)
        assert info_.value.code is ErrorCode.WEBHOOK_NOT_FOUND
        assert info_.value.param == "webhook_id"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"url": "ftp://example.com/hook"}, "url"),
        ({"url": "http:///no-host"}, "url"),
        ({"url": "http://example.com:99999/"}, "url"),
        ({"url": "https://example.com/" + "a" * 3000}, "url"),
        ({"url": None}, "url"),
        ({"url": "http://example.com/a b"}, "url"),
        ({"url": "http://\udc80.example.com/"}, "url"),
        ({"events": []}, "events"),
        ({"events": "job.completed"}, "events"),
        ({"events": ["job.completed", "job.started"]}, "events[1]"),
        ({"secret": ""}, "secret"),
        ({"secret": "line\nbreak"}, "secret"),
        ({"secret": "whsec_not*base64"}, "secret"),
        ({"metadata": ["not", "an", "object"]}, "metadata"),
    ],
)
def test_invalid_registrations_are_400_naming_the_field(
    webhooks: WebhookStore, fields: dict[str, Any], param: str
) -> None:
    request: dict[str, Any] = {"url": "https://example.com/hook", "events": ["job.completed"]}
    with pytest.raises(InvalidRequest) as info:
        webhooks.register(**{**request, **fields})
    assert info.value.param == param
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert webhooks.list() == []


def test_unknown_events_are_answered_with_the_valid_ones(webhooks: WebhookStore) -> None:
    with pytest.raises(InvalidRequest) as info:
        webhooks.register("https://example.com/hook", ["job.started"])
    for name in JobEventName:
        assert name.value in info.value.message


def test_deleting_a_webhook_cancels_its_pending_deliveries(
    webhooks: WebhookStore, queue: SqliteJobQueue
) -> None:
    hook = webhooks.register("https://example.com/hook", ["job.queued"])
    other = webhooks.register("https://example.com/other", ["job.queued"])
    _submit(queue)
    webhooks.delete(hook.id)
    (cancelled,) = webhooks.deliveries(webhook_id=hook.id)
    assert cancelled.status is DeliveryStatus.CANCELLED
    (kept,) = webhooks.deliveries(webhook_id=other.id)
    assert kept.status is DeliveryStatus.PENDING


# -- what is sent ----------------------------------------------------------------------------


async def test_deliveries_carry_the_event_and_both_signatures(
    webhooks: WebhookStore, queue: SqliteJobQueue, receiver: Receiver, clock: Clock
) -> None:
    plain = webhooks.register(receiver.url("/plain"), ["job.queued"], secret="webhook-secret-123")
    key = os.urandom(24)
    standard_secret = "whsec_" + base64.b64encode(key).decode()
    standard = webhooks.register(receiver.url("/std"), ["job.queued"], secret=standard_secret)
    unsigned = webhooks.register(receiver.url("/none"), ["job.queued"])
    async with delivering(webhooks, queue, _policy()):
        job = _submit(queue, metadata={"user_id": "user123", "note": "héllo"})
        await until(_settled(webhooks, 3), "three deliveries")
    (event,) = queue.events(job.id)

    for path, hook in (("/plain", plain), ("/std", standard), ("/none", unsigned)):
        (got,) = receiver.at(path)
        assert got.method == "POST"
        assert got.headers["content-type"] == "application/json"
        assert got.headers["user-agent"] == "fusion-webhooks/1"
        assert got.headers["x-webhook-event"] == "job.queued"
        assert got.headers["x-webhook-id"] == hook.id
        assert got.headers["x-webhook-delivery"].startswith("dlv-")
        assert got.headers["webhook-id"] == got.headers["x-webhook-delivery"]
        assert got.headers["webhook-timestamp"] == str(int(clock.now))
        assert json.loads(got.body) == event.payload
        assert got.body == json.dumps(
            event.payload, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
        (delivery,) = webhooks.deliveries(webhook_id=hook.id)
        assert delivery.id == got.headers["webhook-id"]
        assert delivery.body.encode("utf-8") == got.body

    (signed,) = receiver.at("/plain")
    secret = b"webhook-secret-123"
    assert signed.headers["x-webhook-signature"] == "sha256=" + _hex_hmac(secret, signed.body)
    assert signed.headers["webhook-signature"] == _standard(secret, signed.headers, signed.body)

    (signed,) = receiver.at("/std")
    spec = "sha256=" + _hex_hmac(standard_secret.encode(), signed.body)
    assert signed.headers["x-webhook-signature"] == spec
    assert signed.headers["webhook-signature"] == _standard(key, signed.headers, signed.body)

    (bare,) = receiver.at("/none")
    assert "x-webhook-signature" not in bare.headers
    assert "webhook-signature" not in bare.headers


async def test_only_subscribed_events_and_the_terminal_callback_are_delivered(
    webhooks: WebhookStore, queue: SqliteJobQueue, receiver: Receiver
) -> None:
    done = webhooks.register(receiver.url("/done"), ["job.completed"])
    async with delivering(webhooks, queue, _policy()):
        completed = _submit(
            queue, callback_url=receiver.url("/callback"), callback_secret="cb-secret"
        )
        _complete(queue, completed)
        cancelled = _submit(queue, callback_url=receiver.url("/callback"))
        queue.cancel(cancelled.id)
        await until(_settled(webhooks, 3), "three deliveries")

    (got,) = receiver.at("/done")
    assert got.headers["x-webhook-event"] == "job.completed"
    assert json.loads(got.body)["job"]["job_id"] == completed.id
    assert [d.event for d in webhooks.deliveries(webhook_id=done.id)] == [JobEventName.COMPLETED]

    callbacks = {json.loads(r.body)["job"]["job_id"]: r for r in receiver.at("/callback")}
    assert set(callbacks) == {completed.id, cancelled.id}
    signed, bare = callbacks[completed.id], callbacks[cancelled.id]
    assert signed.headers["x-webhook-event"] == "job.completed"
    assert bare.headers["x-webhook-event"] == "job.cancelled"
    assert signed.headers["x-webhook-id"] == bare.headers["x-webhook-id"] == "callback"
    assert signed.headers["x-webhook-signature"] == "sha256=" + _hex_hmac(b"cb-secret", signed.body)
    assert "x-webhook-signature" not in bare.headers
    assert all(d.webhook_id is None for d in webhooks.deliveries(job_id=cancelled.id))


# -- retries and their limits ----------------------------------------------------------------


async def test_a_failing_receiver_gets_the_same_delivery_again_until_it_succeeds(
    store: Store, receiver: Receiver
) -> None:
    webhooks = WebhookStore(store)  # real time: the backoff is slept through
    queue = SqliteJobQueue(store)
    queue.on_event(record=webhooks.record)
    hook = webhooks.register(receiver.url("/flaky"), ["job.queued"], secret="s")
    receiver.script("/flaky", (500, {}), (502, {}), (200, {}))
    async with delivering(webhooks, queue, _policy(webhook_max_attempts=5)):
        _submit(queue)
        await until(_settled(webhooks, 1), "the delivery")

    (delivery,) = webhooks.deliveries(webhook_id=hook.id)
    assert delivery.status is DeliveryStatus.DELIVERED
    assert (delivery.attempts, delivery.last_status_code) == (3, 200)
    got = receiver.at("/flaky")
    assert len(got) == 3
    assert {r.headers["x-webhook-delivery"] for r in got} == {delivery.id}
    assert {r.body for r in got} == {delivery.body.encode()}
    log = webhooks.attempts(delivery_id=delivery.id)
    assert [(a.attempt, a.status_code, a.ok) for a in log] == [
        (1, 500, False),
        (2, 502, False),
        (3, 200, True),
    ]
    (info,) = webhooks.list()
    assert (info.success_count, info.failure_count) == (1, 2)
    assert info.last_triggered_at == log[-1].at
    assert info.webhook.consecutive_failures == 0


async def test_retry_after_is_honoured(
    webhooks: WebhookStore, queue: SqliteJobQueue, receiver: Receiver, clock: Clock
) -> None:
    webhooks.register(receiver.url("/busy"), ["job.queued"])
    receiver.script("/busy", (503, {"Retry-After": "120"}), (200, {}))
    policy = _policy(webhook_backoff_max_s=600.0)
    async with delivering(webhooks, queue, policy) as deliverer:
        _submit(queue)
        await until(lambda: webhooks.attempts(), "the first attempt")
        (waiting,) = webhooks.deliveries()
        assert waiting.status is DeliveryStatus.PENDING
        assert (waiting.attempts, waiting.last_status_code) == (1, 503)
        assert waiting.next_attempt_at == clock.now + 120
        assert len(receiver.at("/busy")) == 1

        clock.advance(120)
        deliverer.wake()
        await until(_settled(webhooks, 1), "the retry")
    (delivered,) = webhooks.deliveries()
    assert delivered.status is DeliveryStatus.DELIVERED
    assert len(receiver.at("/busy")) == 2


def test_backoff_is_exponential_with_jitter_capped_and_bowing_to_retry_after() -> None:
    policy = _policy(webhook_backoff_base_s=1.0, webhook_backoff_max_s=60.0)
    rng = random.Random(3)
    for attempt in range(1, 12):
        cap = min(60.0, 2.0 ** (attempt - 1))
        assert cap / 2 <= policy.retry_delay(attempt, None, rng) <= cap
    assert policy.retry_delay(1, 30.0, rng) == 30.0
    assert policy.retry_delay(1, 3600.0, rng) == 60.0


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_800_000_000.0
    in_90_s = format_datetime(datetime.fromtimestamp(now + 90, UTC), usegmt=True)
    assert retry_after_s("120", now) == 120.0
    assert retry_after_s(in_90_s, now) == 90.0
    assert retry_after_s(format_datetime(datetime.fromtimestamp(now - 5, UTC)), now) == 0.0
    assert retry_after_s("soon", now) is None
    assert retry_after_s("\u00b2", now) is None
    assert retry_after_s(None, now) is None


async def test_a_redirect_is_a_failure_and_is_not_followed(
    webhooks: WebhookStore, queue: SqliteJobQueue, receiver: Receiver, clock: Clock
) -> None:
    hook = webhooks.register(receiver.url("/moved"), ["job.queued"])
    receiver.always["/moved"] = (302, {"Location": receiver.url("/target")})
    async with delivering(webhooks, queue, _policy(webhook_max_attempts=2)) as deliverer:
        _submit(queue)
        await until(lambda: webhooks.attempts(), "the first attempt")
        clock.advance(1)
        deliverer.wake()
        await until(_settled(webhooks, 1), "the delivery to fail")

    (delivery,) = webhooks.deliveries()
    assert (delivery.status, delivery.last_status_code) == (DeliveryStatus.FAILED, 302)
    assert [(a.status_code, a.ok) for a in webhooks.attempts()] == [(302, False), (302, False)]
    assert "not followed" in (delivery.last_error or "")
    assert len(receiver.at("/moved")) == 2
    assert receiver.at("/target") == []
    assert webhooks.get(hook.id).status is WebhookStatus.ACTIVE


async def test_410_gone_disables_the_webhook_and_cancels_its_other_deliveries(
    webhooks: WebhookStore, queue: SqliteJobQueue, receiver: Receiver
) -> None:
    hook = webhooks.register(receiver.url("/gone"), ["job.queued", "job.processing"])
    receiver.always["/gone"] = (410, {})
    job = _submit(queue)
    assert queue.claim("worker-1", 30.0) is not None
    async with delivering(webhooks, queue, _policy(webhook_max_concurrency=1)):
        await until(_settled(webhooks, 2), "both deliveries to end")
        _submit(queue)  # a disabled webhook gets no new deliveries

    first, second = webhooks.deliveries(webhook_id=hook.id)
    assert (first.event, first.status, first.attempts) == (
        JobEventName.QUEUED,
        DeliveryStatus.FAILED,
        1,
    )
    assert (second.status, second.attempts) == (DeliveryStatus.CANCELLED, 0)
    assert len(receiver.at("/gone")) == 1
    disabled = webhooks.get(hook.id)
    assert disabled.status is WebhookStatus.DISABLED
    assert "410" in (disabled.disabled_reason or "")
    assert len(webhooks.deliveries()) == 2
    assert {d.job_id for d in webhooks.deliveries()} == {job.id}


async def test_a_webhook_is_disabled_after_consecutive_failures(
    webhooks: WebhookStore, queue: SqliteJobQueue, receiver: Receiver, clock: Clock
) -> None:
    hook = webhooks.register(receiver.url("/down"), ["job.queued"])
    receiver.always["/down"] = (500, {})
    policy = _policy(
        webhook_max_attempts=5, webhook_disable_after_failures=3, webhook_max_concurrency=1
    )
    async with delivering(webhooks, queue, policy) as deliverer:
        _submit(queue)
        _submit(queue)
        await until(lambda: len(webhooks.attempts()) == 2, "two attempts")
        clock.advance(1)
        deliverer.wake()
        await until(_settled(webhooks, 2), "the webhook to be disabled")

    disabled = webhooks.get(hook.id)
    assert disabled.status is WebhookStatus.DISABLED
    assert disabled.disabled_reason == "3 consecutive failed delivery attempts"
    log = webhooks.attempts(webhook_id=hook.id)
    assert len(log) == 3
    assert not any(a.ok for a in log)
    assert sorted(d.status for d in webhooks.deliveries()) == [
        DeliveryStatus.CANCELLED,
        DeliveryStatus.FAILED,
    ]
    (info,) = webhooks.list()
    assert (info.success_count, info.failure_count) == (0, 3)
    assert info.last_triggered_at == max(a.at for a in log)


async def test_an_attempt_that_stalls_times_out_as_a_failure(
    webhooks: WebhookStore, queue: SqliteJobQueue, receiver: Receiver
) -> None:
    webhooks.register(receiver.url("/stall"), ["job.queued"])
    receiver.always["/stall"] = (STALL, {})
    policy = _policy(webhook_timeout_s=0.3, webhook_max_attempts=1)
    async with delivering(webhooks, queue, policy):
        _submit(queue)
        await until(_settled(webhooks, 1), "the attempt to time out")

    (delivery,) = webhooks.deliveries()
    assert delivery.status is DeliveryStatus.FAILED
    (attempt,) = webhooks.attempts()
    assert attempt.status_code is None
    assert not attempt.ok
    assert (attempt.error or "").startswith("url_timeout")
    assert len(receiver.at("/stall")) == 1


def test_the_queue_purge_drops_finished_deliveries_and_their_attempts(
    webhooks: WebhookStore, queue: SqliteJobQueue, clock: Clock
) -> None:
    hook = webhooks.register("https://example.com/hook", ["job.queued"])
    _submit(queue)
    _submit(queue)
    first, second = webhooks.deliveries()
    failed = Outcome(ok=False, status_code=500, error="HTTP 500")
    for delivery in (first, second):
        webhooks.settle(
            delivery, failed, at=clock.now, duration_ms=1.0, retry_in_s=5.0, policy=_policy()
        )
    webhooks.settle(
        first,
        Outcome(ok=True, status_code=204),
        at=clock.now,
        duration_ms=1.0,
        retry_in_s=0.0,
        policy=_policy(),
    )
    clock.advance(100)
    queue.on_purge(webhooks.purge)
    assert queue.purge(older_than_s=50) == 0  # the jobs are still queued
    (kept,) = webhooks.deliveries()
    assert (kept.id, kept.status) == (second.id, DeliveryStatus.PENDING)
    assert [a.delivery_id for a in webhooks.attempts()] == [second.id]
    (info,) = webhooks.list()
    assert (info.webhook.id, info.success_count, info.failure_count) == (hook.id, 0, 1)


# -- durability and the SSRF guard -----------------------------------------------------------


async def test_pending_deliveries_survive_a_restart(tmp_path: Path, receiver: Receiver) -> None:
    path = tmp_path / "restart.sqlite3"
    with Store(path) as first:
        webhooks = WebhookStore(first)
        queue = SqliteJobQueue(first)
        queue.on_event(record=webhooks.record)
        webhooks.register(receiver.url("/later"), ["job.queued"])
        job = _submit(queue)
        (pending,) = webhooks.deliveries()
        assert pending.status is DeliveryStatus.PENDING

    with Store(path) as second:
        webhooks = WebhookStore(second)
        deliverer = Deliverer(webhooks, _policy())
        await deliverer.start()
        try:
            await until(_settled(webhooks, 1), "the delivery after the restart")
        finally:
            await deliverer.stop()
        (delivered,) = webhooks.deliveries(job_id=job.id)
    assert delivered.id == pending.id
    assert delivered.status is DeliveryStatus.DELIVERED
    (got,) = receiver.at("/later")
    assert got.headers["x-webhook-delivery"] == pending.id
    assert got.body == pending.body.encode()


async def test_a_host_resolving_to_loopback_is_refused_at_connect_time(
    webhooks: WebhookStore, queue: SqliteJobQueue, receiver: Receiver
) -> None:
    webhooks.register(receiver.url("/ssrf", host="localhost"), ["job.queued"])
    policy = _policy(allow_private_urls=False, webhook_max_attempts=1)
    async with delivering(webhooks, queue, policy):
        _submit(queue)
        await until(_settled(webhooks, 1), "the refused attempt")

    (delivery,) = webhooks.deliveries()
    assert delivery.status is DeliveryStatus.FAILED
    (attempt,) = webhooks.attempts()
    assert not attempt.ok
    assert attempt.status_code is None
    assert (attempt.error or "").startswith("url_not_allowed")
    assert "127.0.0.1" in (attempt.error or "") or "::1" in (attempt.error or "")
    assert receiver.received == []


async def test_fetch_follows_redirects_unless_told_not_to(receiver: Receiver) -> None:
    receiver.always["/from"] = (302, {"Location": "/to"})
    policy = FetchPolicy(allow_private=True, timeout_s=5, max_bytes=1000)
    kept = await fetch(receiver.url("/from"), policy, max_redirects=0)
    assert kept.status_code == 302
    assert receiver.at("/to") == []
    followed = await fetch(receiver.url("/from"), policy)
    assert (followed.status_code, followed.url) == (200, receiver.url("/to"))
    assert len(receiver.at("/to")) == 1
