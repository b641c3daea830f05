"""Per-model request statistics with latency samples for percentiles."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

SAMPLES = 2048


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of sorted samples."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * p // 100))  # ceil without floats drifting
    return sorted_values[int(rank) - 1]


@dataclass
class ModelStats:
    request_count: int = 0
    total_tokens: int = 0
    error_count: int = 0
    last_error_at: float | None = None
    last_error: str | None = None
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))

    def record(self, latency_ms: float, tokens: int) -> None:
        self.request_count += 1
        self.total_tokens += tokens
        self.latencies_ms.append(latency_ms)

    def record_error(self, message: str) -> None:
        self.request_count += 1
        self.error_count += 1
        self.last_error_at = time.time()
        self.last_error = message

    def summary(self) -> dict[str, float | None]:
        ordered = sorted(self.latencies_ms)
        return {
            "avg_latency_ms": round(sum(ordered) / len(ordered), 3) if ordered else None,
            "p50_latency_ms": percentile(ordered, 50),
            "p95_latency_ms": percentile(ordered, 95),
            "p99_latency_ms": percentile(ordered, 99),
        }
