"""bench/run_all.py's table and goal checks on given rows: no benchmark runs here (figures
depend on the machine and its load; performance is never asserted in tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Appended, not prepended: the bench scripts must not shadow any module the suite imports.
sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))

from harness import Goal, Row, read_rows, skipped, write_rows
from run_all import BEGIN, END, markdown_table, replace_section, summary, text_table

pytestmark = pytest.mark.unit

ROWS = [
    Row("orchestrate", "requests/s", 600.0, "req/s", 1200.0, "bare route", Goal(">=", 0.5)),
    Row("jobs", "submits over HTTP", 450.0, "submits/s", 1300.0, "bare", Goal(">=", 500, "ours")),
    Row("jobs", "job latency p50", 6.0, "ms", 1.5, "orchestrate", Goal("<=", 20, "difference")),
    Row("ingest", "chunks/s", 3.0, "chunks/s", 3.2, "encoder alone"),
    skipped("concurrency_gpu", "concurrency.py", "no NVIDIA GPU here"),
]


@pytest.mark.parametrize(
    ("row", "verdict"),
    [
        (ROWS[0], "pass"),  # ratio 0.5 meets >= 0.5 exactly
        (ROWS[1], "miss"),  # our 450/s is under 500/s, whatever the baseline
        (ROWS[2], "pass"),  # 4.5 ms added <= 20 ms
        (ROWS[3], ""),  # no goal: a figure to watch
        (ROWS[4], "skipped"),
        (Row("x", "latency", 2.0, "s", 1.0, "anchor", Goal("<=", 1.0)), "miss"),
        (Row("x", "no baseline measured", 5.0, "tok/s", None, "anchor", Goal(">=", 1.0)), "miss"),
    ],
)
def test_verdict_checks_the_goal_subject(row: Row, verdict: str) -> None:
    assert row.verdict() == verdict


def test_ratio_is_ours_over_baseline_and_absent_without_baseline() -> None:
    assert ROWS[0].ratio == 0.5
    assert Row("x", "f", 1.0).ratio is None
    assert Row("x", "f", 1.0, baseline=0.0).ratio is None


def test_rows_round_trip_through_json(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    write_rows(path, ROWS)
    assert read_rows(path) == ROWS
    write_rows(None, ROWS)  # no --json given: nothing written, no error


def test_tables_hold_every_row_with_ratio_goal_and_result() -> None:
    text = text_table(ROWS)
    lines = text.splitlines()
    assert len(lines) == 1 + len(ROWS)
    assert "0.50" in lines[1]
    assert "ratio >= 0.5" in lines[1]
    assert lines[1].endswith("pass")
    assert ">= 500 submits/s" in lines[2]
    assert lines[2].endswith("miss")
    assert "added <= 20 ms" in lines[3]
    assert "skipped: no NVIDIA GPU here" in lines[5]
    markdown = markdown_table(ROWS).splitlines()
    assert len(markdown) == 2 + len(ROWS)
    assert all(line.startswith("| ") and line.endswith(" |") for line in markdown)
    assert summary(ROWS) == "2 pass, 1 miss, 1 skipped"


def test_latest_section_is_inserted_once_then_replaced_keeping_history() -> None:
    history = "# Benchmarks\n\nIntro.\n\n## Engine overhead\n\nOld figures.\n"
    first = replace_section(history, f"{BEGIN}\ntable one\n{END}")
    assert first.index("table one") < first.index("## Engine overhead")
    second = replace_section(first, f"{BEGIN}\ntable two\n{END}")
    assert "table one" not in second
    assert second.count(BEGIN) == 1
    assert second.startswith("# Benchmarks\n\nIntro.\n")
    assert "Old figures." in second
