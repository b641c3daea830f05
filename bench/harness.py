"""What the benchmarks share: a `fusion serve` process started as a user would, and
timing helpers."""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

READY_TIMEOUT_S = 120.0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    # platform.processor() is empty on most Linux builds: the CPU model and memory are in /proc.
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(
            line.split(":", 1)[1].strip()
            for line in info.splitlines()
            if line.startswith("model name")
        )
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        cpu = f"{cpu} ({model}), {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def fusion_server(data_dir: Path, startup_models: list[dict[str, Any]]) -> Iterator[str]:
    """`fusion serve` in a subprocess with the given models loaded; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "FUSION_CONFIG": str(data_dir / "absent.yaml"),
        "FUSION_DATA_DIR": str(data_dir),
        "FUSION_STARTUP_MODELS": json.dumps(startup_models),
        "FUSION_LOG_LEVEL": "warning",
        # Throughput is measured: the per-client rate limits (spec §8) would refuse it.
        "FUSION_RATE_LIMIT_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "engine.cli", "serve", "--port", str(port)]
    with server_process(command, port, data_dir / "server.log", env) as base:
        yield base


@contextmanager
def server_process(
    command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """A server started by `command` on `port`, once its /health answers 200; yields its
    base URL and stops it afterwards. Its output goes to `log_path`."""
    log = log_path.open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited: see {log_path}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready: {' '.join(command)[:200]}")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def median(samples: list[float]) -> float:
    return statistics.median(samples)


# -- machine-readable results -----------------------------------------------------------------
# Every benchmark reports its headline figures as Rows (its `--json PATH` writes them) and
# bench/run_all.py gathers them into one table: one row type, so the table, the goal check
# and the JSON format live here once rather than in each script.

Op = Literal[">=", "<="]
Subject = Literal["ratio", "ours", "difference"]


@dataclass(frozen=True)
class Goal:
    """A bound on one of a row's numbers: the ratio ours/baseline (the usual case), our value
    itself (submits/s, validation time), or the difference ours - baseline (time a layer
    adds, e.g. overhead per step)."""

    op: Op
    bound: float
    subject: Subject = "ratio"

    def describe(self, unit: str) -> str:
        if self.subject == "ratio":
            return f"ratio {self.op} {self.bound:g}"
        if self.subject == "ours":
            return f"{self.op} {self.bound:g} {unit}".rstrip()
        return f"added {self.op} {self.bound:g} {unit}".rstrip()


@dataclass(frozen=True)
class Row:
    """One figure of a benchmark: our value and the baseline measured in the same run.
    `skipped` holds the reason when the figure could not be measured here."""

    bench: str
    figure: str
    ours: float | None = None
    unit: str = ""
    baseline: float | None = None
    baseline_name: str = ""
    goal: Goal | None = None
    skipped: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.baseline:
            return None
        return self.ours / self.baseline

    def subject_value(self) -> float | None:
        if self.goal is None:
            return None
        if self.goal.subject == "ratio":
            return self.ratio
        if self.goal.subject == "ours":
            return self.ours
        if self.ours is None or self.baseline is None:
            return None
        return self.ours - self.baseline

    def verdict(self) -> str:
        """ "skipped", "pass", "miss", or "" (no goal: a figure to watch, not to meet)."""
        if self.skipped is not None:
            return "skipped"
        value = self.subject_value()
        if self.goal is None:
            return ""
        if value is None:
            return "miss"  # a goal whose figure is missing is not met
        met = value >= self.goal.bound if self.goal.op == ">=" else value <= self.goal.bound
        return "pass" if met else "miss"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Row:
        goal = data.get("goal")
        return cls(**{**data, "goal": Goal(**goal) if goal else None})


def skipped(bench: str, figure: str, reason: str) -> Row:
    return Row(bench=bench, figure=figure, skipped=reason)


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="also write the headline figures as JSON rows"
    )


def write_rows(path: Path | None, rows: list[Row]) -> None:
    if path is not None:
        path.write_text(json.dumps([row.to_json() for row in rows], indent=1))


def read_rows(path: Path) -> list[Row]:
    return [Row.from_json(item) for item in json.loads(path.read_text())]
