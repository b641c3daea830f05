"""Issue #8, the model findings: over-long prompts (warmup and chat), malformed model ids
and what reaches the console log, malformed model directories, the SSRF guard's IPv6
forms that embed an IPv4 address, the image fetch's total deadline, and cancellation of
a request's task stopping its generation on the MLX worker.

Everything runs for real: the tiny synthetic LM through mlx-lm, a uvicorn server on
loopback, and a loopback HTTP server that drips its body one byte at a time."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import StreamReader, load, no_eos_bias, running_server, wait_for
from polling import until

from engine.config import Settings
from engine.errors import InvalidRequest
from engine.logging import configure_logging, get_logger
from engine.models.backends import default_backends
from engine.models.backends.base import ChatChunk, ChatParams
from engine.models.backends.batch_decode import DecodeBatch
from engine.models.decoding import Event, Generation
from engine.models.images import ImagePolicy
from engine.models.registry import ModelRegistry
from engine.models.types import LoadSpec
from engine.net import BlockedAddress, FetchPolicy, fetch, is_public

BOUND_S = 15.0  # an upper bound on any wait: far above the expected time
CONTEXT = 2048  # the tiny LM's context length
PREFILL_STEP = 512
MAX_PROMPT_CHARS = 100_000
USER = [{"role": "user", "content": "hello there"}]


def assert_healthy(client: httpx.Client) -> None:
    """The server survived the bad request: it still answers."""
    assert client.get("/health").status_code == 200


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


@pytest.fixture(scope="module")
def server(tiny_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    data = tmp_path_factory.mktemp("hardening-models")
    with running_server(
        data,
        model_max_prompt_chars=MAX_PROMPT_CHARS,
        model_prefill_step_tokens=PREFILL_STEP,
    ) as client:
        load(client, tiny_lm_dir, "lm", model_id="tiny-lm")
        yield client


# --- finding 1: prompts longer than the model's context -------------------------------------


def test_warmup_of_a_huge_prompt_is_cut_to_the_context_and_the_server_survives(
    server: httpx.Client,
) -> None:
    # The reported crash, scaled under the character limit: a prompt of ~6,000 tokens
    # with a max_length of a billion was prefilled whole, in one pass.
    prompt = "hello world " * 8_000
    response = server.post(
        "/v1/models/tiny-lm/warmup", json={"prompt": prompt, "max_length": 1_000_000_000}
    )
    assert response.status_code == 200, response.text
    assert response.json()["prompt_tokens"] == CONTEXT
    assert_healthy(server)


def test_warmup_prompt_over_the_character_limit_is_refused(server: httpx.Client) -> None:
    prompt = "hello world " * (MAX_PROMPT_CHARS // 12 + 1)
    response = server.post(
        "/v1/models/tiny-lm/warmup", json={"prompt": prompt, "max_length": 1_000_000_000}
    )
    error = error_of(response, 400, "prompt_too_long")
    assert error["param"] == "prompt"
    assert error["type"] == "invalid_request_error"
    assert_healthy(server)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_prompt_longer_than_the_context_is_refused(server: httpx.Client, stream: bool) -> None:
    messages = [{"role": "user", "content": "hello world " * 8_000}]
    response = server.post(
        "/v1/chat/completions",
        json={"model": "tiny-lm", "messages": messages, "max_tokens": 4, "stream": stream},
    )
    error = error_of(response, 400, "context_length_exceeded")
    assert error["param"] == "messages"
    assert_healthy(server)


def test_chat_prompt_over_the_character_limit_is_refused_before_tokenizing(
    server: httpx.Client,
) -> None:
    parts = [{"type": "text", "text": "x" * (MAX_PROMPT_CHARS // 2)}] * 3
    response = server.post(
        "/v1/chat/completions",
        json={"model": "tiny-lm", "messages": [{"role": "user", "content": parts}]},
    )
    assert error_of(response, 400, "prompt_too_long")["param"] == "messages"
    assert_healthy(server)


def test_a_long_prompt_is_tokenized_and_refused_before_it_takes_a_slot(
    server: httpx.Client, tiny_lm_dir: Path
) -> None:
    """Tokenizing happens before the request takes a slot (on a thread of its own).

    Ordering, not speed: a generation that never ends by itself holds the model's one
    slot, yet a prompt over the context is refused (400) while that generation still
    runs, instead of queueing behind it; /health answers throughout."""
    load(server, tiny_lm_dir, "lm", model_id="hold-lm", context_length=2_000, max_concurrency=1)
    hold_body = {
        "model": "hold-lm",
        "messages": USER,
        "max_tokens": 150_000,
        "logit_bias": no_eos_bias(tiny_lm_dir),
    }
    hold = StreamReader(str(server.base_url), hold_body).start()
    try:
        wait_for(
            lambda: server.get("/v1/models/hold-lm/info").json()["queue"]["active"] == 1,
            BOUND_S,
            "the endless generation to hold the model's slot",
        )
        messages = [{"role": "user", "content": "hello world " * (MAX_PROMPT_CHARS // 12)}]
        body = {"model": "hold-lm", "messages": messages}
        error_of(server.post("/v1/chat/completions", json=body), 400, "context_length_exceeded")
        assert_healthy(server)
        assert server.get("/v1/models/hold-lm/info").json()["queue"]["active"] == 1
    finally:
        hold.disconnect()
    wait_for(
        lambda: server.get("/v1/models/hold-lm/info").json()["queue"]["active"] == 0,
        BOUND_S,
        "the disconnected stream to free its slot",
    )
    assert server.delete("/v1/models/hold-lm/unload").status_code == 200


# --- finding 11: model ids ------------------------------------------------------------------

BAD_IDS = [
    "../etc",
    "a/../b",
    "a/./b",
    "..",
    "nul\x00byte",
    "\x1b[31mred\x1b[0m",
    "bell\x07",
    "new\nline",
    "x" * 300,
    "a//b",
    "/lead",
    "with space",
]


@pytest.mark.parametrize("model_id", BAD_IDS)
def test_load_refuses_a_malformed_model_id(
    server: httpx.Client, tiny_lm_dir: Path, model_id: str
) -> None:
    response = server.post(
        "/v1/models/load",
        json={"model_path": str(tiny_lm_dir), "model_type": "lm", "model_id": model_id},
    )
    error = error_of(response, 400, "invalid_model_id")
    assert error["param"] == "model_id"
    assert "\x1b" not in error["message"]
    assert "\x00" not in error["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/%2E%2E/info",
        "/v1/models/a/%2E%2E/b/stats",
        "/v1/models/nul%00/info",
        "/v1/models/%1B%5B2J",
    ],
)
def test_path_parameters_with_malformed_ids_are_refused(server: httpx.Client, path: str) -> None:
    response = server.get(path)
    assert error_of(response, 400, "invalid_model_id")["param"] == "model_id"


def test_chat_naming_a_malformed_model_is_refused_with_param_model(server: httpx.Client) -> None:
    response = server.post(
        "/v1/chat/completions", json={"model": "\x1b]0;owned\x07", "messages": USER}
    )
    assert error_of(response, 400, "invalid_model_id")["param"] == "model"


def test_hub_style_ids_with_a_slash_still_work(server: httpx.Client, tiny_lm_dir: Path) -> None:
    load(server, tiny_lm_dir, "lm", model_id="org-1/tiny_lm.v2:q4")
    assert server.get("/v1/models/org-1/tiny_lm.v2:q4/info").status_code == 200
    assert server.delete("/v1/models/org-1/tiny_lm.v2:q4/unload").status_code == 200


def test_console_log_escapes_control_characters() -> None:
    stream = io.StringIO()
    configure_logging("console", "info", stream=stream)
    try:
        get_logger("fusion.test").info("loading \x1b[2J", model_id="\x1b]0;owned\x07\nforged")
        try:
            raise KeyError("id \x1b[31m")
        except KeyError:
            get_logger("fusion.test").exception("failed")
    finally:
        configure_logging()
    text = stream.getvalue()
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "\\x1b[2J" in text
    assert "\\x0aforged" in text
    assert "Traceback" in text  # tracebacks keep their lines


# --- finding 12c: malformed model directories -----------------------------------------------


def _broken_copy(source: Path, target: Path, break_it: Callable[[Path], None]) -> Path:
    shutil.copytree(source, target)
    break_it(target)
    return target


def _drop(*patterns: str) -> Callable[[Path], None]:
    def drop(path: Path) -> None:
        for pattern in patterns:
            for file in path.glob(pattern):
                file.unlink()

    return drop


def _config(text: str) -> Callable[[Path], None]:
    return lambda path: (path / "config.json").write_text(text)


BREAKAGES = {
    "no-weights": (_drop("*.safetensors"), "safetensors"),
    "no-tokenizer": (_drop("tokenizer*", "vocab*", "merges*"), "tokenizer"),
    "bad-json": (_config("{not json"), "config.json is unreadable"),
    "config-not-an-object": (_config("[1, 2]"), "not a JSON object"),
    "config-without-dimensions": (_config('{"model_type": "qwen2"}'), "cannot be loaded"),
}


@pytest.fixture
def model_dirs(tiny_lm_dir: Path, tiny_vlm_dir: Path, tiny_embedder_dir: Path) -> dict[str, Path]:
    return {"lm": tiny_lm_dir, "multimodal": tiny_vlm_dir, "embeddings": tiny_embedder_dir}


@pytest.mark.parametrize("model_type", ["lm", "multimodal", "embeddings"])
@pytest.mark.parametrize("breakage", list(BREAKAGES))
async def test_malformed_model_directories_are_a_clear_400(
    model_dirs: dict[str, Path], tmp_path: Path, model_type: str, breakage: str
) -> None:
    break_it, named = BREAKAGES[breakage]
    broken = _broken_copy(model_dirs[model_type], tmp_path / "broken", break_it)
    registry = ModelRegistry(default_backends(Settings()), budget_bytes=1 << 34)
    try:
        with pytest.raises(InvalidRequest) as info:
            await asyncio.wait_for(registry.load(LoadSpec(str(broken), model_type)), BOUND_S)
    finally:
        await registry.close()
    assert info.value.param == "model_path"
    assert info.value.code == "invalid_model_path"
    assert named in info.value.message


def test_lm_directory_without_weights_answers_400_over_http(
    server: httpx.Client, tiny_lm_dir: Path, tmp_path: Path
) -> None:
    broken = _broken_copy(tiny_lm_dir, tmp_path / "no-weights", _drop("*.safetensors"))
    response = server.post("/v1/models/load", json={"model_path": str(broken), "model_type": "lm"})
    error = error_of(response, 400, "invalid_model_path")
    assert "safetensors" in error["message"]
    assert_healthy(server)


# --- finding 13: SSRF through IPv6 forms that embed IPv4, and the fetch deadline ------------


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::7f00:1",  # NAT64 well-known prefix -> 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 -> 10.0.0.1
        "64:ff9b:1::7f00:1",  # NAT64 local-use prefix
        "2002:7f00:1::",  # 6to4 -> 127.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 -> 169.254.169.254
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::127.0.0.1",  # IPv4-compatible
        "::a9fe:a9fe",  # IPv4-compatible -> 169.254.169.254
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    ],
)
async def test_ipv6_forms_embedding_a_private_ipv4_are_refused(address: str) -> None:
    import ipaddress

    assert not is_public(ipaddress.ip_address(address))
    policy = ImagePolicy.from_settings(Settings()).fetch
    with pytest.raises(BlockedAddress):
        await fetch(f"http://[{address}]/image.png", policy)


@pytest.mark.parametrize(
    "address", ["64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8", "2606:4700::1111"]
)
def test_ipv6_forms_embedding_a_public_ipv4_stay_allowed(address: str) -> None:
    import ipaddress

    assert is_public(ipaddress.ip_address(address))


class _Drip(BaseHTTPRequestHandler):
    """Answers 200 and then one byte every few milliseconds, never finishing: each read
    is quick, so only a total deadline ends the fetch."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "100000000")
        self.end_headers()
        try:
            while not self.server.stopping.is_set():  # type: ignore[attr-defined]
                self.wfile.write(b"x")
                self.wfile.flush()
                self.server.stopping.wait(0.02)  # type: ignore[attr-defined]
        except OSError:  # the client gave up
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def drip_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    server.stopping = threading.Event()  # type: ignore[attr-defined]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stopping.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()


async def test_a_slow_drip_is_cut_by_the_total_deadline(drip_server: str) -> None:
    policy = FetchPolicy(allow_private=True, timeout_s=0.5, max_bytes=10_000_000)
    with pytest.raises(InvalidRequest) as info:
        # A hang guard only: the drip never ends, so only the 0.5 s total deadline stops it,
        # and url_timeout is the code that deadline answers.
        await asyncio.wait_for(fetch(f"{drip_server}/slow.png", policy), BOUND_S)
    assert info.value.code == "url_timeout"


async def test_an_unreachable_url_is_a_400_not_a_500() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    policy = FetchPolicy(allow_private=True, timeout_s=5, max_bytes=1000)
    with pytest.raises(InvalidRequest) as info:
        await fetch(f"http://127.0.0.1:{port}/x.png", policy)
    assert info.value.code == "url_unreachable"


def test_the_image_deadline_is_the_setting() -> None:
    policy = ImagePolicy.from_settings(Settings(image_fetch_timeout_s=3, image_max_mb=1))
    assert policy.fetch == replace(policy.fetch, timeout_s=3, max_bytes=1_000_000)


# --- cancellation: a cancelled request's task stops its generation ----------------------------

LONG = 2000  # max_tokens of a generation that must still be running when it is cancelled
SURVIVOR = 200  # max_tokens of one that runs beside it: long enough to still run meanwhile


class Generations:
    """Counts what each request's generation in the model's batch produced
    (instrumentation around the real batch's steps, which still do all the work)."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.most = 0  # the most sequences seen decoding together

    def wrap(self, batch: DecodeBatch) -> None:
        real = batch.run
        by_seq: dict[int, dict[str, Any]] = {}

        def counted(
            incoming: list[Generation], deliver: Callable[[list[Event]], None], budget_s: float
        ) -> bool:
            for seq in incoming:
                if not seq.stop.is_set():  # one cancelled while queued never joins
                    by_seq[id(seq)] = run = {"chunks": 0, "ended": threading.Event()}
                    self.runs.append(run)

            def observed(events: list[Event]) -> None:
                self.most = max(self.most, batch.in_batch())
                for seq, item in events:
                    run = by_seq.get(id(seq))
                    if run is not None and isinstance(item, ChatChunk):
                        run["chunks"] += 1
                        if item.finish_reason is not None:
                            run["ended"].set()
                deliver(events)

            return real(incoming, observed, budget_s)

        batch.run = counted  # type: ignore[method-assign]


@pytest.fixture
async def two_slot_lm(tiny_lm_dir: Path) -> AsyncIterator[tuple[ModelRegistry, Generations]]:
    registry = ModelRegistry(default_backends(Settings()), budget_bytes=1 << 34)
    entry = await registry.load(LoadSpec(str(tiny_lm_dir), "lm", model_id="m", max_concurrency=2))
    generations = Generations()
    generations.wrap(entry.model.batch)  # type: ignore[attr-defined]
    yield registry, generations
    await asyncio.wait_for(registry.close(), BOUND_S)


def forced(registry: ModelRegistry, max_tokens: int) -> ChatParams:
    """Greedy, with every end-of-sequence token banned: exactly ``max_tokens`` tokens."""
    tokenizer = registry.get("m").model.tokenizer  # type: ignore[attr-defined]
    bias = {int(t): -1e9 for t in tokenizer.eos_token_ids}
    return ChatParams(max_tokens=max_tokens, temperature=0, logit_bias=bias)


async def _consume(registry: ModelRegistry, params: ChatParams) -> list[ChatChunk]:
    return [chunk async for chunk in registry.chat_stream("m", USER, params)]


@pytest.mark.parametrize("streaming", [False, True])
async def test_cancelling_a_request_task_stops_its_generation_and_frees_its_slot(
    two_slot_lm: tuple[ModelRegistry, Generations], streaming: bool
) -> None:
    """Two requests decode together in one batch; one is cancelled mid-way, and leaves
    the batch at the next step while the other finishes intact."""
    registry, generations = two_slot_lm
    slots = registry.get("m").slots
    long_params = forced(registry, LONG)
    if streaming:
        doomed: asyncio.Task[Any] = asyncio.create_task(_consume(registry, long_params))
    else:
        doomed = asyncio.create_task(registry.chat("m", USER, long_params))
    await until(lambda: generations.runs and generations.runs[0]["chunks"] >= 2, "A generates")
    survivor = asyncio.create_task(registry.chat("m", USER, forced(registry, SURVIVOR)))
    await until(lambda: len(generations.runs) == 2 and generations.runs[1]["chunks"] >= 2, "B too")
    assert slots.active == 2
    assert generations.most == 2  # decoded together

    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(doomed, BOUND_S)
    assert slots.active == 1
    first = generations.runs[0]
    await until(lambda: first["ended"].is_set(), "A leaves the batch")
    assert first["chunks"] < LONG

    result = await asyncio.wait_for(survivor, BOUND_S)
    assert (result.completion_tokens, result.finish_reason) == (SURVIVOR, "length")
    assert isinstance(result.content, str)  # random weights: its tokens may decode to nothing
    assert slots.active == slots.waiting == 0


async def test_a_request_cancelled_while_queued_frees_its_place_and_never_joins(
    two_slot_lm: tuple[ModelRegistry, Generations],
) -> None:
    """The batch is full (two slots): a third request queues, and cancelling it frees its
    place in the queue at once; it never joins the batch."""
    registry, generations = two_slot_lm
    slots = registry.get("m").slots
    running = [
        asyncio.create_task(registry.chat("m", USER, forced(registry, LONG))) for _ in range(2)
    ]
    await until(lambda: len(generations.runs) == 2, "both requests decode")
    queued = asyncio.create_task(registry.chat("m", USER, forced(registry, LONG)))
    await until(lambda: slots.waiting == 1, "the third request queues")

    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(queued, BOUND_S)
    assert (slots.active, slots.waiting) == (2, 0)
    assert not any(run["ended"].is_set() for run in generations.runs)  # both still decode

    for task in running:
        task.cancel()
    await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), BOUND_S)
    assert len(generations.runs) == 2  # the cancelled one never joined
    assert slots.active == 0
