"""Stop a request's work when its client goes away.

A handler that awaits a long run (orchestrate, ingest, a non-streaming chat) never reads
from the connection again once it has the body, so nothing tells it the client left: the
run would go on to the end for nobody. This middleware runs the handler in its own task and,
once the body has been read through to its last chunk, listens on `receive` for
`http.disconnect`; when it comes before the response is complete, the handler task is
cancelled, and the cancellation travels down through normal asyncio cancellation (the
executor cancels its steps, the model registry its generation).

At shutdown the server cancels requests still running after its grace period
(`shutdown_timeout_s` for `fusion serve`); the handler is cancelled the same way and the
client gets a 503 in the §7 envelope.

It never reads a body message itself: listening starts only after the app has taken the
final one, so streamed uploads keep their back-pressure. Streaming responses (SSE) listen
on `receive` as well; the ASGI server hands `http.disconnect` to every waiter, so both see
it.
"""

from __future__ import annotations

import asyncio

import msgspec
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

from engine.errors import ErrorCode, ServiceUnavailable
from engine.logging import get_logger

log = get_logger("server.disconnect")


class CancelOnDisconnectMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        body_read = asyncio.Event()
        started = responded = False

        async def tracking_receive() -> ReceiveMessage:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_read.set()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started, responded
            started = True
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # Set before sending: once the response is complete the server reports
                # `http.disconnect` to waiters, which is not the client leaving. Work after
                # the response (background tasks) is not cancelled.
                responded = True
            await send(message)

        handler = asyncio.ensure_future(next_app(scope, tracking_receive, tracking_send))
        client_left = False

        async def watch() -> None:
            nonlocal client_left
            await body_read.wait()
            while not handler.done():
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not responded:
                        client_left = True
                        log.info("client disconnected: request cancelled", path=scope["path"])
                        handler.cancel()
                    return

        watcher = asyncio.create_task(watch())
        try:
            # Cancelling this task cancels the awaited handler with it.
            await handler
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # Only the server cancels a request's task: at shutdown, once its grace
                # period is over. The client gets a clear 503 rather than a traceback and a
                # bare 500; the cancellation is handled here, so it stops here.
                current.uncancel()
                log.info("server shutting down: request cancelled", path=scope["path"])
                if not responded:
                    await _end_response(send, started=started)
            elif not client_left:
                raise
        finally:
            watcher.cancel()


async def _end_response(send: Send, *, started: bool) -> None:
    if started:
        # A streamed response is cut where it is, but ends as a well-formed message.
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    error = ServiceUnavailable("the server is shutting down", code=ErrorCode.SHUTTING_DOWN)
    body = msgspec.json.encode(error.envelope())
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
