"""All MLX work runs on one dedicated thread.

MLX streams and compiled-function caches are thread-local or unsynchronised (mlx issues
#2133, #3078): loading on one thread and generating on another fails or races. One worker
thread also makes memory readings around a load exact, since nothing else allocates
meanwhile. Per-model concurrency limits decide admission; compute is serialised here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


class MLXWorker:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def stream(
        self, make: Callable[[], Iterator[T]], stop: threading.Event
    ) -> AsyncGenerator[T, None]:
        """Iterate a blocking generator on the worker thread, yielding its items here as
        they come. Closing the async iterator early (client gone, task cancelled) sets
        ``stop``, which the generator watches, so the worker stops at its next item."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        # Whether the generator began: one closed while still queued behind other work
        # must not wait for that work, and must not start when its turn comes.
        begun = [False]
        turn = threading.Lock()

        def produce() -> None:
            try:
                with turn:
                    if stop.is_set():
                        return
                    begun[0] = True
                for item in make():
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                    if stop.is_set():
                        break
            except BaseException as exc:
                loop.call_soon_threadsafe(queue.put_nowait, _Failure(exc))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        future = loop.run_in_executor(self._executor, produce)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()
            with turn:
                running = begun[0]
            # A generation that began must end before the caller releases the model's slot.
            if running:
                await asyncio.shield(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
