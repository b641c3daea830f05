"""The job service (engine/jobs/service.py) with its workers and operations, on a real
Engine: tiny models loaded through the real loaders, a real SQLite queue, the real
workflow runner. Every wait polls the database or the registry under a deadline."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import itertools
import json
import math
import wave
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from step_helpers import png_data_uri

from engine.config import Settings
from engine.errors import Conflict, ErrorCode, FusionError, NotFound
from engine.jobs.queue import SqliteJobQueue
from engine.jobs.service import JobService, JobSubmission
from engine.jobs.types import Job, JobEvent, JobEventName, JobPriority, JobRequest, JobStatus
from engine.logging import configure_logging
from engine.services import Engine
from server.routes.fusion import run_body

LM, EMBEDDER = "tiny-lm", "tiny-embedder"
BOUND_S = 60.0  # a deadline for any wait here, reached only when something is wrong
MESSAGES = [{"role": "user", "content": "hello"}]
LONG = 2000  # max_tokens of a generation that must still run when the test acts on it
ECHO_WORKFLOW = """
id: echo
input_schema:
  type: object
  properties:
    n: {type: integer}
  required: [n]
steps:
  - step_id: double
    type: template
    value: "{{ input.n * 2 }}"
  - step_id: triple
    type: template
    value: "{{ steps.double.output + input.n }}"
output:
  value: "{{ steps.triple.output }}"
"""


@pytest.fixture
async def engine(
    tmp_path: Path, tiny_lm_dir: Path, tiny_embedder_dir: Path
) -> AsyncIterator[Engine]:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "echo.yaml").write_text(ECHO_WORKFLOW)
    settings = Settings(
        data_dir=tmp_path / "data",
        workflows_dir=workflows,
        startup_models=[
            # One job at a time: tests queue jobs behind a running one.
            {
                "model_path": str(tiny_lm_dir),
                "model_type": "lm",
                "model_id": LM,
                "max_concurrency": 1,
            },
            {
                "model_path": str(tiny_embedder_dir),
                "model_type": "embeddings",
                "model_id": EMBEDDER,
            },
        ],
    )
    started = await Engine.start(settings)
    yield started
    await started.stop()


ServiceFactory = Callable[..., JobService]


@pytest.fixture
async def make_service(engine: Engine) -> AsyncIterator[ServiceFactory]:
    """JobServices on the engine's store; started ones are stopped at the end."""
    made: list[JobService] = []

    def make(**settings: Any) -> JobService:
        merged = dataclasses.replace(engine.settings, **settings)
        queue = SqliteJobQueue.from_settings(engine.store, merged)
        assert engine.fusion is not None
        service = JobService(queue, engine.models, engine.fusion, merged, run_body)
        made.append(service)
        return service

    yield make
    for service in made:
        await service.stop()


@pytest.fixture
def service(make_service: ServiceFactory) -> JobService:
    return make_service()


def no_eos(engine: Engine) -> dict[str, float]:
    tokenizer = engine.models.get(LM).model.tokenizer  # type: ignore[attr-defined]
    return {str(t): -1e9 for t in tokenizer.eos_token_ids}


def chat(max_tokens: int = 4, **extra: Any) -> JobSubmission:
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, **extra}
    return JobSubmission(operation="chat", input=body, model_id=LM)


def embed(texts: Any = ("one", "two"), **kw: Any) -> JobSubmission:
    return JobSubmission(operation="embed", input={"input": list(texts)}, model_id=EMBEDDER, **kw)


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    try:
        async with asyncio.timeout(BOUND_S):
            while not await condition():  # noqa: ASYNC110 - state in the database
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


async def job_of(service: JobService, job_id: str) -> Job:
    return (await service.get(job_id)).job


async def finished(service: JobService, job_id: str) -> Job:
    async def done() -> bool:
        return (await job_of(service, job_id)).status.terminal

    await until(done, f"job {job_id} finished")
    return await job_of(service, job_id)


async def submitted(service: JobService, submission: JobSubmission) -> str:
    state, created = await service.submit(submission)
    assert created
    return state.job.id


# -- running each operation ---------------------------------------------------------------------
async def test_chat_job_completes_with_usage(service: JobService) -> None:
    await service.start()
    job = await finished(service, await submitted(service, chat(max_tokens=5)))
    assert (job.status, job.progress, job.attempts, job.error) == (JobStatus.COMPLETED, 1, 1, None)
    usage = job.result["usage"]
    assert usage["completion_tokens"] >= 1
    assert usage["prompt_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert isinstance(job.result["content"], str)
    assert job.result["finish_reason"] in ("stop", "length")


async def test_embed_job_returns_one_vector_per_text(service: JobService) -> None:
    await service.start()
    job = await finished(service, await submitted(service, embed(["a", "b", "c"])))
    assert job.status is JobStatus.COMPLETED
    result = job.result
    assert len(result["embeddings"]) == 3
    assert {len(v) for v in result["embeddings"]} == {result["dimensions"]}
    assert result["truncated"] == [False, False, False]
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] > 0


async def test_workflow_job_result_is_the_run_body_and_the_run_is_stored(
    service: JobService, engine: Engine
) -> None:
    await service.start()
    submission = JobSubmission(
        operation="workflow", input={"workflow": "echo", "input": {"n": 7}}, model_id=None
    )
    job = await finished(service, await submitted(service, submission))
    assert (job.status, job.progress) == (JobStatus.COMPLETED, 1)
    body = job.result
    assert body["status"] == "completed"
    assert body["result"] == {"value": 21}
    assert [step["step"] for step in body["execution_trace"]] == ["double", "triple"]
    assert engine.fusion is not None
    stored = engine.fusion.get_run(body["workflow_id"])
    assert stored.result.output == {"value": 21}


async def test_transcribe_job_is_checked_before_it_is_queued(service: JobService) -> None:
    """No whisper model is loaded here, and the audio is checked as a WAV file."""
    with pytest.raises(FusionError) as raised:
        await service.submit(
            JobSubmission(operation="transcribe", input={"audio": _wav()}, model_id=LM)
        )
    assert (raised.value.code, raised.value.param) == (ErrorCode.WRONG_MODEL_TYPE, "model_id")


def _wav() -> str:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16_000)
        wav.writeframes(b"\x00\x00" * 1600)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# -- validation ---------------------------------------------------------------------------------
INVALID: list[tuple[JobSubmission, int, ErrorCode, str]] = [
    (JobSubmission("draw", {}, LM), 400, ErrorCode.INVALID_OPERATION, "operation"),
    (chat(colour="red"), 400, ErrorCode.UNKNOWN_FIELD, "input.colour"),
    (
        JobSubmission("chat", {"messages": [{"content": "x"}]}, LM),
        400,
        ErrorCode.INVALID_REQUEST,
        "input.messages[0].role",
    ),
    (JobSubmission("chat", {"messages": []}, LM), 400, ErrorCode.INVALID_REQUEST, "input.messages"),
    (JobSubmission("chat", {}, LM), 400, ErrorCode.INVALID_REQUEST, "input.messages"),
    (chat(max_tokens=0), 400, ErrorCode.INVALID_REQUEST, "input.max_tokens"),
    (chat(logit_bias={"x": 1}), 400, ErrorCode.INVALID_LOGIT_BIAS, "input.logit_bias"),
    (chat(logit_bias={"99999999": 1}), 400, ErrorCode.INVALID_LOGIT_BIAS, "input.logit_bias"),
    (
        JobSubmission("chat", {"messages": MESSAGES}, None),
        400,
        ErrorCode.INVALID_REQUEST,
        "model_id",
    ),
    (JobSubmission("chat", [1], LM), 400, ErrorCode.INVALID_REQUEST, "input"),
    (
        JobSubmission("chat", {"messages": MESSAGES}, "nope"),
        404,
        ErrorCode.MODEL_NOT_FOUND,
        "model_id",
    ),
    (
        JobSubmission("vision", {"messages": MESSAGES}, LM),
        400,
        ErrorCode.WRONG_MODEL_TYPE,
        "model_id",
    ),
    (JobSubmission("embed", {"input": "x"}, LM), 400, ErrorCode.WRONG_MODEL_TYPE, "model_id"),
    (embed([]), 400, ErrorCode.INVALID_REQUEST, "input.input"),
    (
        JobSubmission("transcribe", {"audio": "not base64!"}, EMBEDDER),
        400,
        ErrorCode.WRONG_MODEL_TYPE,
        "model_id",
    ),
    (
        JobSubmission("workflow", {"input": {"n": 1}}, None),
        400,
        ErrorCode.INVALID_REQUEST,
        "input.workflow",
    ),
    (
        JobSubmission("workflow", {"workflow": "nope"}, None),
        404,
        ErrorCode.INVALID_WORKFLOW,
        "input.workflow",
    ),
    (
        JobSubmission("workflow", {"workflow": "echo", "input": {"n": "x"}}, None),
        400,
        ErrorCode.INVALID_INPUT,
        "input/input/n",
    ),
    (
        JobSubmission("workflow", {"workflow": "echo", "input": {"n": 1}}, "nope"),
        404,
        ErrorCode.MODEL_NOT_FOUND,
        "model_id",
    ),
    (embed(callback_url="ftp://example.com/x"), 400, ErrorCode.INVALID_REQUEST, "callback_url"),
    (embed(callback_url="http:///nohost"), 400, ErrorCode.INVALID_REQUEST, "callback_url"),
    (embed(metadata={"x": "y" * 20_000}), 400, ErrorCode.METADATA_TOO_LARGE, "metadata"),
]


@pytest.mark.parametrize(("submission", "status", "code", "param"), INVALID)
async def test_an_invalid_submission_names_its_field_and_queues_nothing(
    service: JobService, submission: JobSubmission, status: int, code: ErrorCode, param: str
) -> None:
    with pytest.raises(FusionError) as raised:
        await service.submit(submission)
    error = raised.value
    assert (error.status, error.code, error.param) == (status, code, param), error.message
    assert (await service.list()).total == 0


async def test_idempotency_key_answers_the_same_job(service: JobService) -> None:
    first, created = await service.submit(embed(idempotency_key="k1"))
    again, created_again = await service.submit(embed(idempotency_key="k1"))
    assert (created, created_again, again.job.id) == (True, False, first.job.id)
    with pytest.raises(FusionError) as raised:
        await service.submit(embed(["other"], idempotency_key="k1"))
    assert raised.value.code is ErrorCode.IDEMPOTENCY_KEY_REUSED


# -- scheduling ---------------------------------------------------------------------------------
async def test_workers_take_high_then_normal_then_low(service: JobService) -> None:
    ids = {
        priority: await submitted(service, embed(priority=priority))
        for priority in (JobPriority.LOW, JobPriority.NORMAL, JobPriority.HIGH)
    }
    await service.start()
    jobs = {p: await finished(service, job_id) for p, job_id in ids.items()}
    order = sorted(jobs, key=lambda p: jobs[p].started_at or math.inf)
    assert order == [JobPriority.HIGH, JobPriority.NORMAL, JobPriority.LOW]


async def test_a_busy_model_holds_up_only_its_own_jobs(service: JobService, engine: Engine) -> None:
    """The tiny LM runs one job at a time: the second waits for the first to end, while
    the embedder's job, queued after it, is claimed at once. (Compute itself is serialised
    on the one MLX thread; claims are not.)"""
    await service.start()
    bias = no_eos(engine)
    running = await submitted(service, chat(LONG, logit_bias=bias))
    await _processing(service, running)
    waiting = await submitted(service, chat(LONG, logit_bias=bias))
    embedding = await submitted(service, embed())

    async def embed_claimed() -> bool:
        return (await job_of(service, embedding)).status is not JobStatus.QUEUED

    await until(embed_claimed, "the embed job was claimed")
    for job_id in (running, waiting):
        with contextlib.suppress(Conflict):
            await service.cancel(job_id)
    first_ended = (await job_of(service, running)).completed_at
    assert first_ended is not None
    started = (await job_of(service, embedding)).started_at
    assert started is not None
    assert started < first_ended
    waited = await asyncio.to_thread(service.queue.events, waiting)
    assert all(e.at >= first_ended for e in waited if e.name is JobEventName.PROCESSING)


async def test_workflow_jobs_run_at_most_jobs_workflow_concurrency_at_once(
    make_service: ServiceFactory,
) -> None:
    service = make_service(jobs_workflow_concurrency=1)
    ids = [
        await submitted(
            service,
            JobSubmission("workflow", {"workflow": "echo", "input": {"n": n}}, None),
        )
        for n in range(3)
    ]
    await service.start()
    jobs = [await finished(service, job_id) for job_id in ids]
    assert [job.result["result"] for job in jobs] == [{"value": 3 * n} for n in range(3)]
    # Claims and finishes are committed in order, so their times say what overlapped.
    for before, after in itertools.pairwise(jobs):
        assert before.completed_at is not None
        assert after.started_at is not None
        assert after.started_at >= before.completed_at


async def test_queued_job_has_a_position_and_an_estimate_once_measured(
    service: JobService,
) -> None:
    first = await submitted(service, embed())
    second, _ = await service.submit(embed(["x"]))
    assert (second.position_in_queue, second.estimated_completion_ms) == (2, None)
    await service.start()
    await finished(service, first)
    await finished(service, second.job.id)
    await service.stop()
    third, _ = await service.submit(embed(["y"]))
    assert third.position_in_queue == 1
    assert third.estimated_completion_ms is not None
    assert third.estimated_completion_ms >= 0


async def test_events_replay_then_follow_until_the_end(service: JobService) -> None:
    job_id = await submitted(service, embed())
    await service.start()
    events = [event async for event in service.events(job_id)]
    names = [event.name for event in events]
    assert names == [JobEventName.QUEUED, JobEventName.PROCESSING, JobEventName.COMPLETED]
    # A client that saw some of them resumes after the last it saw.
    resumed = [event.seq async for event in service.events(job_id, after=events[0].seq)]
    assert resumed == [event.seq for event in events[1:]]
    assert [event async for event in service.events(job_id, after=events[-1].seq)] == []


# -- long generations: progress, cancel, stop, superseded ---------------------------------------
class FinishesAfterAnEmptyRead(SqliteJobQueue):
    """Finishes the leased job just after a read of events found nothing new: a worker
    finishing between an event stream's read and its check of the job's status."""

    lease: tuple[str, int] | None = None

    def events(self, job_id: str, after_seq: int = 0) -> Sequence[JobEvent]:
        found = super().events(job_id, after_seq)
        if not found and self.lease is not None:
            leased, token = self.lease
            self.lease = None
            self.finish(leased, token, result={"ok": True})
        return found


async def test_an_event_stream_sees_the_end_that_lands_between_its_reads(
    engine: Engine,
) -> None:
    queue = FinishesAfterAnEmptyRead(engine.store)
    assert engine.fusion is not None
    service = JobService(queue, engine.models, engine.fusion, engine.settings, run_body)
    job = queue.submit(JobRequest(operation="chat", input={}, model_id=LM)).job
    claimed = queue.claim("test", 30.0)
    assert claimed is not None
    queue.lease = (claimed.id, claimed.lease_token)
    names = [event.name async for event in service.events(job.id)]
    assert names == [JobEventName.QUEUED, JobEventName.PROCESSING, JobEventName.COMPLETED]


async def _processing(service: JobService, job_id: str, *, progress: bool = False) -> Job:
    async def running() -> bool:
        job = await job_of(service, job_id)
        assert not job.status.terminal, job
        return job.status is JobStatus.PROCESSING and (not progress or 0 < (job.progress or 0) < 1)

    await until(running, f"job {job_id} processing")
    return await job_of(service, job_id)


async def test_progress_grows_while_a_long_generation_runs(
    service: JobService, engine: Engine
) -> None:
    await service.start()
    job_id = await submitted(service, chat(LONG, logit_bias=no_eos(engine)))
    job = await _processing(service, job_id, progress=True)
    assert job.progress is not None
    assert 0 < job.progress < 1
    await service.cancel(job_id)


async def test_cancel_stops_a_generation_and_frees_the_model(
    service: JobService, engine: Engine
) -> None:
    await service.start()
    long_id = await submitted(service, chat(LONG, logit_bias=no_eos(engine)))
    await _processing(service, long_id, progress=True)
    cancelled = await service.cancel(long_id)
    assert cancelled.status is JobStatus.CANCELLED
    # The model's one slot serves the next job only once the generation stopped.
    short = await finished(service, await submitted(service, chat(max_tokens=2)))
    assert short.status is JobStatus.COMPLETED
    job = await job_of(service, long_id)
    assert (job.status, job.result) == (JobStatus.CANCELLED, None)
    names = [e.name for e in await asyncio.to_thread(service.queue.events, long_id)]
    assert JobEventName.COMPLETED not in names
    assert engine.models.get(LM).slots.active == 0


async def test_stop_puts_running_jobs_back_without_using_an_attempt(
    service: JobService, engine: Engine
) -> None:
    await service.start()
    job_id = await submitted(service, chat(LONG, logit_bias=no_eos(engine)))
    assert (await _processing(service, job_id)).attempts == 1
    await service.stop()
    job = await job_of(service, job_id)
    assert (job.status, job.attempts, job.lease_owner) == (JobStatus.QUEUED, 0, None)
    assert engine.models.get(LM).slots.active == 0


async def test_start_requeues_jobs_left_processing_and_fails_them_after_max_attempts(
    make_service: ServiceFactory,
) -> None:
    service = make_service(jobs_max_attempts=2)
    queue = service.queue
    doomed = await submitted(service, embed(["a"]))
    survivor = await submitted(service, embed(["b"]))
    # Processes that died: the first claimed `doomed`; the next claimed both.
    claims = ["dead-1", "dead-2", "dead-2"]
    for n, worker in enumerate(claims):
        if n == 1:
            assert queue.recover(now=math.inf).requeued == [doomed]
        assert queue.claim(worker, 30.0, model_ids=[EMBEDDER]) is not None
    assert [queue.get(j).attempts for j in (doomed, survivor)] == [2, 1]
    await service.start()
    failed = await finished(service, doomed)
    assert (failed.status, failed.attempts) == (JobStatus.FAILED, 2)
    assert failed.error is not None
    assert "no attempts are left" in failed.error
    completed = await finished(service, survivor)
    assert (completed.status, completed.attempts) == (JobStatus.COMPLETED, 2)


async def test_an_attempt_whose_lease_was_taken_back_writes_nothing(
    service: JobService, engine: Engine
) -> None:
    await service.start()
    job_id = await submitted(service, chat(LONG, logit_bias=no_eos(engine)))
    await _processing(service, job_id, progress=True)
    queue = service.queue
    # Another server takes the lease back and claims the job, on this thread, before the
    # running attempt can see it.
    assert queue.recover(now=math.inf).requeued == [job_id]
    other = queue.claim("other-server", 60.0, operations=["chat"])
    assert other is not None
    assert other.attempts == 2
    slots = engine.models.get(LM).slots

    async def stopped() -> bool:
        return slots.active == 0

    await until(stopped, "the superseded generation stopped")
    job = await job_of(service, job_id)
    assert (job.status, job.lease_owner, job.attempts) == (JobStatus.PROCESSING, "other-server", 2)
    assert queue.finish(job_id, other.lease_token, result={"by": "other"})
    assert (await job_of(service, job_id)).result == {"by": "other"}


async def test_a_job_whose_model_was_unloaded_fails_with_the_reason(
    make_service: ServiceFactory, engine: Engine
) -> None:
    service = make_service(jobs_lease_s=0.3)  # the reaper looks every 0.1 s
    job_id = await submitted(service, embed())
    await engine.models.unload(EMBEDDER)
    await service.start()
    job = await finished(service, job_id)
    assert job.status is JobStatus.FAILED
    assert job.error == f"model '{EMBEDDER}' not found"


async def test_finished_jobs_are_purged_after_the_retention(make_service: ServiceFactory) -> None:
    service = make_service(jobs_retention_hours=0.0, jobs_lease_s=0.3)
    await service.start()
    job_id = await submitted(service, embed())
    await finished(service, job_id)

    async def purged() -> bool:
        try:
            await service.get(job_id)
        except NotFound:
            return True
        return False

    await until(purged, "the finished job was purged")


# -- vision and transcription -------------------------------------------------------------------
VLM, WHISPER = "tiny-vlm", "tiny-whisper"


@pytest.fixture
async def media_engine(
    tmp_path: Path, tiny_vlm_dir: Path, tiny_whisper_dir: Path
) -> AsyncIterator[Engine]:
    settings = Settings(
        data_dir=tmp_path / "data",
        workflows_dir=tmp_path / "no-workflows",
        audio_max_file_mb=0.01,
        startup_models=[
            {"model_path": str(tiny_vlm_dir), "model_type": "multimodal", "model_id": VLM},
            {"model_path": str(tiny_whisper_dir), "model_type": "whisper", "model_id": WHISPER},
        ],
    )
    started = await Engine.start(settings)
    yield started
    await started.stop()


async def test_vision_and_transcribe_jobs_complete(media_engine: Engine) -> None:
    assert media_engine.fusion is not None
    queue = SqliteJobQueue(media_engine.store)
    service = JobService(
        queue, media_engine.models, media_engine.fusion, media_engine.settings, run_body
    )
    image = {"type": "image_url", "image_url": {"url": png_data_uri()}}
    look = [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]}]
    vision_id = await submitted(
        service, JobSubmission("vision", {"messages": look, "max_tokens": 3}, VLM)
    )
    listen_id = await submitted(
        service, JobSubmission("transcribe", {"audio": _wav(), "language": "en"}, WHISPER)
    )
    await service.start()
    try:
        seen = await finished(service, vision_id)
        heard = await finished(service, listen_id)
    finally:
        await service.stop()
    assert seen.status is JobStatus.COMPLETED, seen.error
    assert seen.result["usage"]["completion_tokens"] >= 1
    assert heard.status is JobStatus.COMPLETED, heard.error
    assert isinstance(heard.result["text"], str)


@pytest.mark.parametrize(
    ("audio", "code"),
    [
        ("not base64!", ErrorCode.INVALID_REQUEST),
        (base64.b64encode(b"RIFF0000WAVEjunk").decode(), ErrorCode.UNSUPPORTED_AUDIO),
        (base64.b64encode(b"\0" * 20_000).decode(), ErrorCode.PAYLOAD_TOO_LARGE),
    ],
)
async def test_transcribe_audio_is_checked_before_it_is_queued(
    media_engine: Engine, audio: str, code: ErrorCode
) -> None:
    assert media_engine.fusion is not None
    service = JobService(
        SqliteJobQueue(media_engine.store),
        media_engine.models,
        media_engine.fusion,
        media_engine.settings,
        run_body,
    )
    with pytest.raises(FusionError) as raised:
        await service.submit(JobSubmission("transcribe", {"audio": audio}, WHISPER))
    assert (raised.value.code, raised.value.param) == (code, "input.audio")


async def test_a_jobs_log_lines_name_the_job_and_its_run(service: JobService) -> None:
    failing = {
        "steps": [{"step_id": "boom", "type": "template", "value": "{{ 1 // input.zero }}"}],
        "input_schema": {"type": "object", "properties": {"zero": {"type": "integer"}}},
    }
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    try:
        await service.start()
        job_id = await submitted(
            service,
            JobSubmission(
                operation="workflow",
                input={"workflow": "custom", "definition": failing, "input": {"zero": 0}},
                model_id=None,
            ),
        )
        job = await finished(service, job_id)
    finally:
        configure_logging()
    assert job.result["status"] == "failed"
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    (failed,) = [line for line in lines if line["event"] == "step_failed"]
    assert failed["job_id"] == job_id
    assert failed["workflow_id"] == "custom"
    assert failed["run_id"] == job.result["workflow_id"]
