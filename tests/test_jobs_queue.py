"""engine.jobs.queue's SQLite backend on real database files. Time is an injected clock,
so leases, aging and retention are decided by the test, not by waiting."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from manual_clock import Clock

from engine.errors import Conflict, ErrorCode, InvalidRequest, NotFound, QueueFull
from engine.jobs.queue import SqliteJobQueue
from engine.jobs.types import (
    Job,
    JobPriority,
    JobQuery,
    JobRequest,
    JobSort,
    JobStatus,
    SortOrder,
)
from engine.store import Store

LEASE_S = 30.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "jobs.sqlite3") as opened:
        yield opened


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(store: Store, clock: Clock) -> SqliteJobQueue:
    return SqliteJobQueue(store, clock=clock)


def _chat(
    text: str = "hi",
    *,
    priority: JobPriority = JobPriority.NORMAL,
    idempotency_key: str | None = None,
    callback_url: str | None = None,
) -> JobRequest:
    return JobRequest(
        operation="chat",
        input={"messages": [text]},
        model_id="m",
        priority=priority,
        idempotency_key=idempotency_key,
        callback_url=callback_url,
    )


def _claimed(job: Job | None) -> Job:
    assert job is not None
    assert job.status is JobStatus.PROCESSING
    return job


def test_submit_commits_a_queued_job_seen_by_a_new_store(tmp_path: Path, clock: Clock) -> None:
    with Store(tmp_path / "jobs.sqlite3") as store:
        submission = SqliteJobQueue(store, clock=clock).submit(
            _chat(callback_url="https://example.com/hook", priority=JobPriority.HIGH)
        )
    assert submission.created
    job = submission.job
    assert job.id.startswith("job-")
    assert len(job.id) == 36
    with Store(tmp_path / "jobs.sqlite3") as reopened:
        again = SqliteJobQueue(reopened, clock=clock).get(job.id)
    assert again == job
    assert (again.status, again.attempts, again.max_attempts) == (JobStatus.QUEUED, 0, 3)
    assert again.input == {"messages": ["hi"]}
    assert again.created_at == clock.now
    assert again.started_at is None


def test_get_and_cancel_of_an_unknown_job_are_job_not_found(queue: SqliteJobQueue) -> None:
    for call in (queue.get, queue.cancel, queue.position_in_queue):
        with pytest.raises(NotFound) as caught:
            call("job-missing")
        assert caught.value.code is ErrorCode.JOB_NOT_FOUND


def test_a_full_queue_refuses_with_retry_after(store: Store, clock: Clock) -> None:
    queue = SqliteJobQueue(store, clock=clock, max_queued=2, retry_after_s=7)
    first = queue.submit(_chat("1")).job
    queue.submit(_chat("2"))
    with pytest.raises(QueueFull) as caught:
        queue.submit(_chat("3"))
    assert (caught.value.status, caught.value.code) == (429, ErrorCode.QUEUE_FULL)
    assert caught.value.headers == {"Retry-After": "7"}
    # Only waiting jobs count: once one is claimed there is room again.
    assert _claimed(queue.claim("w", LEASE_S)).id == first.id
    assert queue.submit(_chat("3")).created


def test_idempotency_key_returns_the_job_or_conflicts(store: Store, clock: Clock) -> None:
    queue = SqliteJobQueue(store, clock=clock, max_queued=1)
    first = queue.submit(_chat(idempotency_key="k1"))
    # The same request again: the same job, even though the queue is now full.
    again = queue.submit(_chat(idempotency_key="k1"))
    assert (again.created, again.job) == (False, first.job)
    with pytest.raises(Conflict) as caught:
        queue.submit(_chat("another body", idempotency_key="k1"))
    assert caught.value.status == 409
    assert first.job.id in caught.value.message
    assert queue.list().total == 1


def test_priority_orders_claims_high_normal_low(queue: SqliteJobQueue) -> None:
    low = queue.submit(_chat(priority=JobPriority.LOW)).job
    normal = queue.submit(_chat(priority=JobPriority.NORMAL)).job
    high = queue.submit(_chat(priority=JobPriority.HIGH)).job
    second_high = queue.submit(_chat(priority=JobPriority.HIGH)).job
    assert [queue.position_in_queue(j.id) for j in (high, second_high, normal, low)] == [
        1,
        2,
        3,
        4,
    ]
    order = [_claimed(queue.claim("w", LEASE_S)).id for _ in range(4)]
    assert order == [high.id, second_high.id, normal.id, low.id]
    assert queue.claim("w", LEASE_S) is None
    assert queue.position_in_queue(low.id) is None  # processing, not waiting


def test_a_low_job_starts_within_the_aging_bound_under_a_stream_of_high_jobs(
    store: Store, clock: Clock
) -> None:
    aging_s = 10.0
    queue = SqliteJobQueue(store, clock=clock, aging_s=aging_s, max_queued=10_000)
    backlog = [queue.submit(_chat(priority=JobPriority.HIGH)).job for _ in range(5)]
    low = queue.submit(_chat(priority=JobPriority.LOW)).job
    submitted_at = {job.id: job.created_at for job in backlog}
    # Every second one more high job arrives and one job is claimed: the high jobs alone
    # would keep the worker busy forever.
    claimed: list[str] = []
    while low.id not in claimed:
        clock.advance(1.0)
        high = queue.submit(_chat(priority=JobPriority.HIGH)).job
        submitted_at[high.id] = high.created_at
        claimed.append(_claimed(queue.claim("w", LEASE_S)).id)
        assert len(claimed) < 1000, "the low job starved"
    overtakers = claimed[:-1]
    # The bound: only jobs queued before it or high jobs submitted less than 2 * aging_s
    # after it were claimed first (here: the backlog of 5 plus 2 * aging_s * 1/s).
    assert all(submitted_at[i] < low.created_at + 2 * aging_s for i in overtakers)
    assert len(overtakers) <= len(backlog) + 2 * aging_s * 1.0
    assert len(overtakers) > len(backlog)  # it did wait behind later high jobs


def test_claim_filters_by_operation_and_model(queue: SqliteJobQueue) -> None:
    chat = queue.submit(_chat()).job
    embed = queue.submit(JobRequest(operation="embed", input={"input": "x"}, model_id="e")).job
    flow = queue.submit(JobRequest(operation="workflow", input={"workflow": "w"})).job
    assert _claimed(queue.claim("w", LEASE_S, operations=["embed"])).id == embed.id
    assert queue.claim("w", LEASE_S, model_ids=["other"]) is None
    assert _claimed(queue.claim("w", LEASE_S, model_ids=[None])).id == flow.id
    assert _claimed(queue.claim("w", LEASE_S, operations=["chat"], model_ids=["m"])).id == chat.id


def test_claim_is_a_lease_extended_by_heartbeats_with_progress(
    queue: SqliteJobQueue, clock: Clock
) -> None:
    job_id = queue.submit(_chat()).job.id
    job = _claimed(queue.claim("worker-1", LEASE_S))
    assert (job.attempts, job.lease_token, job.lease_owner) == (1, 1, "worker-1")
    assert (job.lease_expires_at, job.started_at, job.progress) == (
        clock.now + LEASE_S,
        clock.now,
        0.0,
    )
    clock.advance(20)
    assert queue.heartbeat(job_id, job.lease_token, LEASE_S, progress=0.25)
    after = queue.get(job_id)
    assert (after.lease_expires_at, after.progress) == (clock.now + LEASE_S, 0.25)
    # The heartbeat moved the expiry: the original one has passed, the lease holds.
    clock.advance(15)
    assert queue.recover().requeued == []
    with pytest.raises(ValueError, match="progress"):
        queue.heartbeat(job_id, job.lease_token, LEASE_S, progress=1.5)
    assert queue.finish(job_id, job.lease_token, result={"text": "done"})
    done = queue.get(job_id)
    assert (done.status, done.result, done.progress) == (JobStatus.COMPLETED, {"text": "done"}, 1)
    assert (done.completed_at, done.lease_owner, done.lease_expires_at) == (clock.now, None, None)


def test_finish_with_an_error_fails_the_job(queue: SqliteJobQueue) -> None:
    job_id = queue.submit(_chat()).job.id
    job = _claimed(queue.claim("w", LEASE_S))
    assert queue.finish(job_id, job.lease_token, error="model exploded")
    failed = queue.get(job_id)
    assert (failed.status, failed.error, failed.result) == (
        JobStatus.FAILED,
        "model exploded",
        None,
    )
    # Finished once: a second finish writes nothing.
    assert not queue.finish(job_id, job.lease_token, result="late")


def test_a_superseded_attempt_never_writes(queue: SqliteJobQueue, clock: Clock) -> None:
    job_id = queue.submit(_chat()).job.id
    first = _claimed(queue.claim("slow-worker", LEASE_S))
    clock.advance(LEASE_S)
    recovered = queue.recover()
    assert recovered.requeued == [job_id]
    assert recovered.failed == []
    requeued = queue.get(job_id)
    assert (requeued.status, requeued.attempts, requeued.lease_owner) == (
        JobStatus.QUEUED,
        1,
        None,
    )
    # Taken back and not yet claimed again: the old attempt is already fenced off.
    assert not queue.heartbeat(job_id, first.lease_token, LEASE_S)
    second = _claimed(queue.claim("fresh-worker", LEASE_S))
    assert second.lease_token == 2
    assert not queue.heartbeat(job_id, first.lease_token, LEASE_S, progress=0.9)
    assert not queue.finish(job_id, first.lease_token, result="stale")
    assert queue.get(job_id).status is JobStatus.PROCESSING
    assert queue.finish(job_id, second.lease_token, result="fresh")
    assert queue.get(job_id).result == "fresh"


def test_recover_fails_a_job_after_max_attempts(store: Store, clock: Clock) -> None:
    queue = SqliteJobQueue(store, clock=clock, max_attempts=2)
    job_id = queue.submit(_chat()).job.id
    for attempt in (1, 2):
        assert _claimed(queue.claim("w", LEASE_S)).attempts == attempt
        clock.advance(LEASE_S + 1)
        recovery = queue.recover()
    assert recovery.failed == [job_id]
    assert recovery.requeued == []
    failed = queue.get(job_id)
    assert failed.status is JobStatus.FAILED
    assert failed.completed_at == clock.now
    assert failed.error is not None
    assert "attempt 2 of 2" in failed.error
    assert queue.claim("w", LEASE_S) is None


def test_recover_at_infinity_takes_back_every_lease(queue: SqliteJobQueue) -> None:
    ids = [queue.submit(_chat(str(i))).job.id for i in range(3)]
    for _ in ids:
        _claimed(queue.claim("crashed-server", 3600))
    assert sorted(queue.recover(now=math.inf).requeued) == sorted(ids)
    assert queue.list(JobQuery(status=JobStatus.PROCESSING)).total == 0


def test_release_requeues_without_using_an_attempt(queue: SqliteJobQueue) -> None:
    first_id = queue.submit(_chat("first")).job.id
    queue.submit(_chat("second"))
    job = _claimed(queue.claim("stopping-worker", LEASE_S))
    assert job.id == first_id
    assert not queue.release(first_id, job.lease_token + 1)  # not this attempt's lease
    assert queue.release(first_id, job.lease_token)
    released = queue.get(first_id)
    assert (released.status, released.attempts, released.lease_owner, released.progress) == (
        JobStatus.QUEUED,
        0,
        None,
        None,
    )
    # It keeps its place in line, and its events say it was queued again.
    assert queue.position_in_queue(first_id) == 1
    assert [e.name.value for e in queue.events(first_id)] == [
        "job.queued",
        "job.processing",
        "job.queued",
    ]
    again = _claimed(queue.claim("w", LEASE_S))
    assert (again.id, again.attempts) == (first_id, 1)
    queue.cancel(first_id)
    assert not queue.release(first_id, again.lease_token)
    assert queue.get(first_id).status is JobStatus.CANCELLED


def test_cancel_is_final(queue: SqliteJobQueue) -> None:
    waiting = queue.submit(_chat("queued")).job
    running_id = queue.submit(_chat("running")).job.id
    assert queue.cancel(waiting.id).status is JobStatus.CANCELLED
    running = _claimed(queue.claim("w", LEASE_S))
    assert running.id == running_id
    cancelled = queue.cancel(running_id)
    assert (cancelled.status, cancelled.lease_owner) == (JobStatus.CANCELLED, None)
    # The worker learns at its next heartbeat, and its result is never written.
    assert not queue.heartbeat(running_id, running.lease_token, LEASE_S)
    assert not queue.finish(running_id, running.lease_token, result="too late")
    assert queue.get(running_id).status is JobStatus.CANCELLED
    assert queue.recover(now=math.inf).requeued == []
    for job_id in (waiting.id, running_id):
        with pytest.raises(Conflict, match="already cancelled"):
            queue.cancel(job_id)


def test_cancelling_a_finished_job_conflicts(queue: SqliteJobQueue) -> None:
    job_id = queue.submit(_chat()).job.id
    job = _claimed(queue.claim("w", LEASE_S))
    queue.finish(job_id, job.lease_token, result=1)
    with pytest.raises(Conflict, match="already completed") as caught:
        queue.cancel(job_id)
    assert caught.value.status == 409


def test_list_filters_sorts_and_pages(queue: SqliteJobQueue, clock: Clock) -> None:
    made = []
    for i, priority in enumerate([JobPriority.LOW, JobPriority.HIGH, JobPriority.NORMAL] * 2):
        model = "a" if i % 2 == 0 else "b"
        made.append(queue.submit(JobRequest("chat", {"i": i}, model, priority)).job)
        clock.advance(1)
    queue.cancel(made[0].id)
    page = queue.list()
    assert page.total == 6
    assert [j.id for j in page.items] == [j.id for j in reversed(made)]
    assert [j.id for j in queue.list(JobQuery(order=SortOrder.ASC, limit=2, offset=1)).items] == [
        made[1].id,
        made[2].id,
    ]
    by_model = queue.list(JobQuery(model_id="a", status=JobStatus.QUEUED, order=SortOrder.ASC))
    assert (by_model.total, [j.id for j in by_model.items]) == (2, [made[2].id, made[4].id])
    by_priority = queue.list(JobQuery(sort_by=JobSort.PRIORITY, order=SortOrder.ASC))
    assert [j.priority for j in by_priority.items] == [
        JobPriority.HIGH,
        JobPriority.HIGH,
        JobPriority.NORMAL,
        JobPriority.NORMAL,
        JobPriority.LOW,
        JobPriority.LOW,
    ]
    by_status = queue.list(JobQuery(sort_by=JobSort.STATUS, order=SortOrder.ASC))
    assert by_status.items[0].status is JobStatus.CANCELLED
    assert queue.list(JobQuery(offset=6)).items == []
    assert queue.list(JobQuery(offset=6)).total == 6
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}):
        with pytest.raises(InvalidRequest) as caught:
            queue.list(JobQuery(**bad))  # type: ignore[arg-type]
        assert caught.value.param == next(iter(bad))
    assert queue.list(JobQuery(limit=1000)).total == 6


def test_purge_deletes_only_jobs_finished_before_the_retention(
    queue: SqliteJobQueue, clock: Clock
) -> None:
    old = queue.submit(_chat("old")).job
    queue.cancel(old.id)
    clock.advance(100)
    recent = queue.submit(_chat("recent")).job
    job = _claimed(queue.claim("w", LEASE_S))
    queue.finish(recent.id, job.lease_token, result="r")
    waiting = queue.submit(_chat("waiting")).job
    clock.advance(50)
    assert queue.purge(older_than_s=120) == 1
    with pytest.raises(NotFound):
        queue.get(old.id)
    assert {j.id for j in queue.list().items} == {recent.id, waiting.id}
    clock.advance(100)
    assert queue.purge(older_than_s=120) == 1
    assert [j.id for j in queue.list().items] == [waiting.id]


def test_concurrent_claimers_never_get_the_same_job(store: Store, clock: Clock) -> None:
    queue = SqliteJobQueue(store, clock=clock, max_queued=10_000)
    submitted = {queue.submit(_chat(str(i))).job.id for i in range(200)}
    claimed: list[list[str]] = [[] for _ in range(4)]
    start = threading.Barrier(len(claimed))
    # Half the workers go through a second Store on the same file, as another server
    # process would; each thread has its own connection either way (Store.connection()).
    with Store(store.path) as other_store:
        queues = [queue, SqliteJobQueue(other_store, clock=clock)]

        def work(worker: int) -> None:
            mine = queues[worker % 2]
            start.wait()
            while (job := mine.claim(f"worker-{worker}", LEASE_S)) is not None:
                claimed[worker].append(job.id)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(len(claimed))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    every = [job_id for mine in claimed for job_id in mine]
    assert len(every) == len(set(every)) == len(submitted)
    assert set(every) == submitted
    assert queue.list(JobQuery(status=JobStatus.PROCESSING, limit=1000)).total == 200
    assert all(j.attempts == 1 for j in queue.list(JobQuery(limit=1000)).items)


def test_counts_per_status_follow_every_change(queue: SqliteJobQueue, store: Store) -> None:
    def truth() -> dict[JobStatus, int]:
        found = dict.fromkeys(JobStatus, 0)
        for status, n in store.query("SELECT status, count(*) FROM jobs GROUP BY status"):
            found[JobStatus(status)] = n
        return found

    ids = [queue.submit(_chat(str(i))).job.id for i in range(6)]
    done, failed, released, _lost = (queue.claim("w", LEASE_S) for _ in range(4))
    assert done is not None
    assert failed is not None
    assert released is not None
    queue.finish(done.id, done.lease_token, result={"ok": True})
    queue.finish(failed.id, failed.lease_token, error="no")
    queue.release(released.id, released.lease_token)
    queue.cancel(ids[5])
    queue.recover(now=math.inf)
    assert queue.counts() == truth()
    assert queue.list().total == sum(truth().values())
    assert queue.list(JobQuery(status=JobStatus.QUEUED)).total == truth()[JobStatus.QUEUED]
    assert queue.purge(older_than_s=-1) == 3
    assert queue.counts() == truth()
