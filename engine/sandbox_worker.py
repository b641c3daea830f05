"""The sandbox's worker process (``python -m engine.sandbox_worker``): reads framed
msgpack requests on stdin, runs each under its memory budget, answers on stdout.

Protocol: each frame is a 4-byte big-endian length and a msgpack body; the worker first
sends an empty frame once it is ready. Request:
``[target, payload, memory_mb]``; answer: ``[true, result]`` or
``[false, [exception type name, message]]``.
"""

from __future__ import annotations

import importlib
import os
import resource
import struct
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

import msgspec

_HEADER = struct.Struct("!I")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_functions: dict[str, Callable[[Any], Any]] = {}


def _resolve(target: str) -> Callable[[Any], Any]:
    found = _functions.get(target)
    if found is None:
        module, _, name = target.partition(":")
        if not module.startswith("engine.") or not name:
            raise ValueError(f"not a sandbox target: {target!r}")
        found = _functions[target] = getattr(importlib.import_module(module), name)
    return found


def _address_space() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[0]) * _PAGE


def _cap_memory(memory_mb: int) -> None:
    """The budget is on top of what the worker already maps (interpreter, imports)."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = _address_space() + memory_mb * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _uncap_memory() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def _read_exact(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


# Imported before the worker says it is ready, so a call's budget is not spent on them.
_PRELOAD = ("engine.dsl.rendering", "engine.runtime.inputs")


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    for module in _PRELOAD:
        importlib.import_module(module)
    answers.write(_HEADER.pack(0))  # ready
    answers.flush()
    while True:
        header = _read_exact(requests, _HEADER.size)
        if header is None:
            return
        body = _read_exact(requests, _HEADER.unpack(header)[0])
        if body is None:
            return
        target, payload, memory_mb = decoder.decode(body)
        del body
        try:
            function = _resolve(target)
            _cap_memory(memory_mb)
            try:
                answer = encoder.encode((True, function(payload)))
            finally:
                _uncap_memory()
        except MemoryError:
            answer = encoder.encode((False, ("MemoryError", "out of memory")))
        except BaseException as exc:
            answer = encoder.encode((False, (type(exc).__name__, str(exc)[:2000])))
        answers.write(_HEADER.pack(len(answer)) + answer)
        answers.flush()


def main() -> None:
    # stdout carries the protocol alone: anything a library prints goes to stderr.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        serve(sys.stdin.buffer, answers)
    except BrokenPipeError:
        # The parent went away (a CLI command that ends before its warmed workers were
        # ready): nobody is left to answer, and the traceback would land on its terminal.
        os._exit(0)


if __name__ == "__main__":
    main()
