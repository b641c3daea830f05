"""The recent errors /internal/diagnostics reports: the newest few in full, and a count of
every one of the last 24 hours.

Bounded twice: the full records are at most `max_errors` (the newest) and none older than
the window; the count is kept per minute, so it holds at most one number per minute of
the window however many errors there were. Safe to feed from any thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 24 * 3600.0
_BUCKET_S = 60.0


@dataclass(frozen=True)
class RecordedError:
    at: float  # epoch seconds
    message: str
    code: str
    status: int | None  # the HTTP status; None for an error no request answered (a job's)
    request_id: str | None = None
    route: str | None = None  # the route template, never the raw path
    model: str | None = None
    job_id: str | None = None


class RecentErrors:
    def __init__(
        self,
        max_errors: int,
        *,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._window_s = window_s
        self._clock = clock
        self._kept: deque[RecordedError] = deque(maxlen=max_errors)
        self._per_minute: deque[list[int]] = deque()  # [minute, count], oldest first
        self._lock = threading.Lock()

    def record(
        self,
        message: str,
        code: str,
        status: int | None,
        *,
        request_id: str | None = None,
        route: str | None = None,
        model: str | None = None,
        job_id: str | None = None,
    ) -> RecordedError:
        error = RecordedError(
            self._clock(), message, code, status, request_id, route, model, job_id
        )
        minute = int(error.at // _BUCKET_S)
        with self._lock:
            self._kept.append(error)
            if self._per_minute and self._per_minute[-1][0] == minute:
                self._per_minute[-1][1] += 1
            else:
                self._per_minute.append([minute, 1])
            self._expire(error.at)
        return error

    def snapshot(self) -> tuple[int, list[RecordedError]]:
        """(errors of the window, counted to the minute; the kept ones, newest first)."""
        with self._lock:
            self._expire(self._clock())
            count = sum(n for _, n in self._per_minute)
            return count, list(reversed(self._kept))

    def _expire(self, now: float) -> None:
        oldest = now - self._window_s
        while self._kept and self._kept[0].at < oldest:
            self._kept.popleft()
        # A minute counts while any part of it is inside the window.
        while self._per_minute and (self._per_minute[0][0] + 1) * _BUCKET_S <= oldest:
            self._per_minute.popleft()
