"""Bounded polling for state another task or thread changes (slot counts, a batch's
progress on the MLX worker) that no event announces."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

BOUND_S = 15.0  # far above the expected time of any wait it is used for


async def until(condition: Callable[[], bool], what: str, limit_s: float = BOUND_S) -> None:
    try:
        async with asyncio.timeout(limit_s):
            while not condition():  # noqa: ASYNC110 - nothing to wait on but the state itself
                await asyncio.sleep(0.002)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None
