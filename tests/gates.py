"""A test step type that holds a run open until the test says: `test_gate` waits until the
test opens its gate, from the test's thread, so a run stays `running` as long as the test
needs (tests/test_runs_live.py, tests/test_runs_io.py, the UI's browser tests). One set
for the whole session: each test names its own gates."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from engine.steps.base import StepContext, StepPlugin


class Gates:
    """asyncio events on the server's loop, opened from the test's thread."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def event(self, name: str) -> asyncio.Event:
        """On the server's loop."""
        self._loop = asyncio.get_running_loop()
        return self._events.setdefault(name, asyncio.Event())

    def open(self, name: str) -> None:
        assert self._loop is not None, "no step has waited on a gate yet"
        self._loop.call_soon_threadsafe(lambda: self.event(name).set())


GATES = Gates()


class GateStep(StepPlugin):
    """Test-only: waits until the test opens gate `gate`; outputs its name."""

    type_name = "test_gate"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"gate": {"type": "string"}},
        "required": ["gate"],
    }

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        await GATES.event(params["gate"]).wait()
        return params["gate"]
