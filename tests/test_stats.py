"""Per-model statistics: nearest-rank percentiles and the summary the stats endpoint shows."""

from __future__ import annotations

import pytest

from engine.models.stats import SAMPLES, ModelStats, percentile

# The nearest-rank example: the p-th percentile is the smallest value with at least p% of
# the samples at or below it (rank = ceil(p/100 * n), 1-based).
FIVE = [15.0, 20.0, 35.0, 40.0, 50.0]


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (5, 15.0),
        (20, 15.0),
        (30, 20.0),
        (40, 20.0),
        (50, 35.0),
        (60, 35.0),
        (61, 40.0),
        (80, 40.0),
        (81, 50.0),
        (95, 50.0),
        (100, 50.0),
    ],
)
def test_percentile_nearest_rank(p: float, expected: float) -> None:
    assert percentile(FIVE, p) == expected


def test_percentile_on_a_hundred_samples_is_the_rank_itself() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, p) for p in (1, 50, 95, 99, 100)] == [1.0, 50.0, 95.0, 99.0, 100.0]


def test_percentile_edges() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 1) == 7.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 0) == 1.0  # rank is at least 1
    # An even count: the median is the lower middle value (ceil(0.5 * 4) = 2), not the mean.
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 51) == 3.0


def test_summary_after_recorded_requests() -> None:
    stats = ModelStats()
    assert stats.summary() == {
        "avg_latency_ms": None,
        "p50_latency_ms": None,
        "p95_latency_ms": None,
        "p99_latency_ms": None,
    }
    for latency, tokens in [(40.0, 4), (10.0, 1), (30.0, 3), (20.0, 2)]:  # out of order
        stats.record(latency, tokens)
    assert stats.request_count == 4
    assert stats.total_tokens == 10
    assert stats.error_count == 0
    assert stats.last_error is None
    assert stats.summary() == {
        "avg_latency_ms": 25.0,
        "p50_latency_ms": 20.0,
        "p95_latency_ms": 40.0,
        "p99_latency_ms": 40.0,
    }


def test_errors_are_counted_as_requests_without_latency_samples() -> None:
    stats = ModelStats()
    stats.record(12.0, 5)
    stats.record_error("RuntimeError: boom")
    stats.record_error("ValueError: second")
    assert stats.request_count == 3
    assert stats.error_count == 2
    assert stats.last_error == "ValueError: second"
    assert stats.last_error_at is not None
    assert stats.total_tokens == 5
    summary = stats.summary()
    assert summary["avg_latency_ms"] == 12.0
    assert summary["p99_latency_ms"] == 12.0


def test_latency_window_keeps_the_latest_samples() -> None:
    stats = ModelStats()
    for _ in range(SAMPLES):
        stats.record(1000.0, 1)
    for _ in range(SAMPLES):
        stats.record(1.0, 1)  # pushes every old sample out of the window
    assert len(stats.latencies_ms) == SAMPLES
    assert stats.request_count == 2 * SAMPLES
    assert stats.total_tokens == 2 * SAMPLES
    assert stats.summary()["p99_latency_ms"] == 1.0
