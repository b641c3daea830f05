"""Budgeted worker processes for computations a request controls.

Template rendering beyond the provably linear subset, JSON Schema validation of
non-trivial schemas and document extraction run here: in a separate process whose
address space is capped for each call (RLIMIT_AS), under a wall-clock deadline after
which the process is killed and replaced. A bomb then costs one worker and one error
answer; the server process and its event loop never run the computation.

Calls name a module-level function as ``"engine.module:function"``; the worker imports it
(it must not import MLX) and calls it with one payload. Payloads and results cross the
pipe as msgpack (never pickle: a compromised worker must not be able to run code in the
server), so both are plain data: dicts, lists, str, bytes, numbers, bools and None.

The pool is process-wide and loop-agnostic: blocking calls run on a thread of the pool's
own executor, so any event loop (the server's, a CLI's, a test's) can await them.
"""

from __future__ import annotations

import asyncio
import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog

log = structlog.get_logger(__name__)

_HEADER = struct.Struct("!I")
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder()
# The directory holding the `engine` package: the worker runs from it, so it imports this
# very code whatever the server's working directory.
_ROOT = Path(__file__).resolve().parent.parent
# How long a new worker may take to import what it runs and say it is ready.
_START_GRACE_S = 10.0


class SandboxError(Exception):
    """The sandboxed function failed: ``type_name`` is its exception's class name."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message


class SandboxTimeout(SandboxError):
    def __init__(self, seconds: float) -> None:
        super().__init__("SandboxTimeout", f"exceeded its time budget of {seconds:g} s")


class SandboxMemoryError(SandboxError):
    def __init__(self, memory_mb: int) -> None:
        super().__init__("SandboxMemoryError", f"exceeded its memory budget of {memory_mb} MB")


class SandboxCrashed(SandboxError):
    def __init__(self, detail: str) -> None:
        super().__init__("SandboxCrashed", f"the worker process died ({detail})")


@dataclass(frozen=True)
class Budget:
    """What one kind of sandboxed call may spend: wall-clock seconds and memory."""

    timeout_s: float = 5.0
    memory_mb: int = 256


@dataclass(frozen=True)
class SandboxLimits:
    """The pool's size; each call brings its own time and memory budget."""

    workers: int = 2


class _Worker:
    """One worker process and its pipes; used by one thread at a time."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.sandbox_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the worker's stderr is the server's: its tracebacks are logged
            close_fds=True,
            cwd=_ROOT,
            # The worker's resource limits must not follow a user's Ctrl-C to it first.
            start_new_session=True,
        )
        self.fresh = True

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def call(self, target: str, payload: Any, timeout_s: float, memory_mb: int) -> Any:
        assert self.proc.stdin is not None
        frame = _ENCODER.encode((target, payload, memory_mb))
        try:
            if self.fresh:  # its imports are not the call's time: wait for "ready" first
                self._read(_HEADER.size, time.monotonic() + _START_GRACE_S, _START_GRACE_S)
                self.fresh = False
            deadline = time.monotonic() + timeout_s
            self.proc.stdin.write(_HEADER.pack(len(frame)) + frame)
            self.proc.stdin.flush()
            header = self._read(_HEADER.size, deadline, timeout_s)
            body = self._read(_HEADER.unpack(header)[0], deadline, timeout_s)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise SandboxCrashed(self._exit_detail()) from exc
        ok, value = _DECODER.decode(body)
        if ok:
            return value
        type_name, message = value
        if type_name == "MemoryError":
            raise SandboxMemoryError(memory_mb)
        raise SandboxError(type_name, message)

    def _read(self, size: int, deadline: float, timeout_s: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        chunks: list[bytes] = []
        while size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise SandboxTimeout(timeout_s)
            chunk = os.read(fd, min(size, 1 << 20))
            if not chunk:
                raise SandboxCrashed(self._exit_detail())
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def _exit_detail(self) -> str:
        try:
            code = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        return f"signal {-code}" if code < 0 else f"exit status {code}"


class _Ticket:
    """One async call's hold on its worker, so cancelling the call can kill the worker:
    a caller that has gone (a client disconnect) must not leave its computation running."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.worker: _Worker | None = None
        self.cancelled = False

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            if self.worker is not None and self.worker.alive():
                self.worker.proc.kill()  # the calling thread then reads EOF and moves on


class Sandbox:
    def __init__(self, limits: SandboxLimits | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = ThreadPoolExecutor(
            max_workers=self.limits.workers, thread_name_prefix="sandbox"
        )

    async def call(
        self,
        target: str,
        payload: Any,
        *,
        timeout_s: float,
        memory_mb: int,
    ) -> Any:
        """Run ``target(payload)`` in a worker; SandboxTimeout, SandboxMemoryError,
        SandboxCrashed or SandboxError (the function's own exception) on failure."""
        loop = asyncio.get_running_loop()
        ticket = _Ticket()
        try:
            return await loop.run_in_executor(
                self._threads, self.call_sync, target, payload, timeout_s, memory_mb, ticket
            )
        except asyncio.CancelledError:
            ticket.cancel()
            raise

    def call_sync(
        self,
        target: str,
        payload: Any,
        timeout_s: float,
        memory_mb: int,
        ticket: _Ticket | None = None,
    ) -> Any:
        timeout = max(min(timeout_s, 3600.0), 0.001)
        worker = self._acquire()
        if ticket is not None:
            with ticket.lock:
                if ticket.cancelled:
                    self._release(worker, keep=True)
                    raise SandboxCrashed("the call was cancelled before it started")
                ticket.worker = worker
        keep = False
        try:
            result = worker.call(target, payload, timeout, memory_mb)
            keep = True
            return result
        except SandboxError as exc:
            # The function's own exceptions leave the worker sound; a budget overrun or a
            # crash does not (a MemoryError may leave the interpreter in any state).
            keep = type(exc) is SandboxError
            if not keep and not (ticket is not None and ticket.cancelled):
                log.warning("sandbox_worker_replaced", target=target, reason=exc.message)
            raise
        finally:
            if ticket is not None:
                with ticket.lock:
                    ticket.worker = None
            self._release(worker, keep)

    def _acquire(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise SandboxCrashed("the sandbox is closed")
            try:
                return self._idle.get_nowait()
            except queue.Empty:
                pass
        return _Worker()

    def warm(self) -> None:
        """Start the workers now, so the first requests do not wait for their imports."""
        for _ in range(self.limits.workers - self._idle.qsize()):
            self._idle.put(_Worker())

    def _release(self, worker: _Worker, keep: bool) -> None:
        if keep and worker.alive() and not self._closed:
            self._idle.put(worker)
        else:
            worker.kill()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                break
        self._threads.shutdown(wait=False, cancel_futures=True)


# Process-wide pools by purpose: long document extractions ("documents") must not hold
# the workers that every workflow step's templates wait for ("default").
_shared: dict[str, Sandbox] = {}
_shared_limits = SandboxLimits()
_shared_lock = threading.Lock()


def shared_sandbox(pool: str = "default") -> Sandbox:
    """The process-wide pool for ``pool`` (created on first use)."""
    with _shared_lock:
        found = _shared.get(pool)
        if found is None:
            found = _shared[pool] = Sandbox(_shared_limits)
        return found


def configure_shared_sandbox(limits: SandboxLimits) -> Sandbox:
    """Set the process-wide pools' limits (the server does this from its Settings); the
    default pool is returned."""
    global _shared_limits
    with _shared_lock:
        _shared_limits = limits
        stale = [name for name, pool in _shared.items() if pool.limits != limits]
        old = [_shared.pop(name) for name in stale]
    for pool in old:
        pool.close()
    return shared_sandbox()
