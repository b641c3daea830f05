"""Engine overhead per step: a 200-step chain and a 200-wide fan-out of `template` steps
run by the engine, against a hand-written asyncio program doing the same Jinja renders
(same compiled expressions, one task per step) in the same process. A third case chains
templates outside the provably linear subset, which the engine renders in the sandbox's
worker processes (engine.sandbox) while the baseline still renders in-process: its
overhead is the price of the time and memory budgets. Also times static validation of a
100-step workflow.

    .venv/bin/python bench/engine_overhead.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable

from harness import Goal, Row, add_json_option, write_rows

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.compiler import compile_document
from engine.dsl.source import load_text
from engine.dsl.templating import ENV
from engine.runtime.executor import Runner
from engine.steps.registry import default_registry

N = 200


def chain_yaml(n: int, expression: str = "steps.s{prev}.output + 1") -> str:
    steps = ["  - {step_id: s0, type: template, value: 0}"]
    steps += [
        f'  - {{step_id: s{i}, type: template, value: "{{{{ {expression.format(prev=i - 1)} }}}}"}}'
        for i in range(1, n)
    ]
    return "id: chain\nsteps:\n" + "\n".join(steps) + "\n"


def fanout_yaml(n: int) -> str:
    steps = ["  - {step_id: root, type: template, value: 0}"]
    steps += [
        f'  - {{step_id: s{i}, type: template, value: "{{{{ steps.root.output + {i} }}}}"}}'
        for i in range(n)
    ]
    return "id: fanout\nsteps:\n" + "\n".join(steps) + "\n"


def compile_yaml(text: str) -> CompiledWorkflow:
    return compile_document(load_text(text), default_registry())


async def baseline_chain(n: int, exprs: list | None = None) -> int:
    exprs = exprs or BASELINE_CHAIN
    steps: dict[str, dict] = {"s0": {"output": 0}}
    scope = {"steps": steps}

    async def render(i: int) -> int:
        return exprs[i](scope)

    for i in range(1, n):
        steps[f"s{i}"] = {"output": await asyncio.create_task(render(i))}
    return steps[f"s{n - 1}"]["output"]


async def baseline_fanout(n: int) -> list[int]:
    exprs = BASELINE_FANOUT
    scope = {"steps": {"root": {"output": 0}}}

    async def render(i: int) -> int:
        return exprs[i](scope)

    return await asyncio.gather(*(asyncio.create_task(render(i)) for i in range(n)))


BASELINE_CHAIN = [None] + [
    ENV.compile_expression(f"steps.s{i - 1}.output + 1", undefined_to_none=False)
    for i in range(1, N)
]
# `*` is outside the provably linear subset: these render in the sandbox's worker processes.
SANDBOXED = "steps.s{prev}.output * 1 + 1"
BASELINE_SANDBOXED = [None] + [
    ENV.compile_expression(SANDBOXED.format(prev=i - 1), undefined_to_none=False)
    for i in range(1, N)
]
BASELINE_FANOUT = [
    ENV.compile_expression(f"steps.root.output + {i}", undefined_to_none=False) for i in range(N)
]


def timed(fn: Callable[[], Awaitable[object]], repeats: int) -> list[float]:
    async def all_runs() -> list[float]:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            await fn()
            samples.append(time.perf_counter() - start)
        return samples

    return asyncio.run(all_runs())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    add_json_option(parser)
    args = parser.parse_args()
    machine = f"{platform.machine()} {platform.processor()}".strip()
    print(f"machine: {machine}, {os.cpu_count()} cores, python {platform.python_version()}")

    rows: list[Row] = []
    runner = Runner(max_parallel=N + 1)
    cases = {
        "chain": (compile_yaml(chain_yaml(N)), lambda: baseline_chain(N), N),
        "fan-out": (compile_yaml(fanout_yaml(N)), lambda: baseline_fanout(N), N + 1),
        "chain, sandboxed templates": (
            compile_yaml(chain_yaml(N, SANDBOXED)),
            lambda: baseline_chain(N, BASELINE_SANDBOXED),
            N,
        ),
    }
    for name, (workflow, baseline, steps) in cases.items():
        engine = timed(lambda wf=workflow: runner.run(wf), args.repeats)
        base = timed(baseline, args.repeats)
        e_med, b_med = statistics.median(engine), statistics.median(base)
        per_step_ms = (e_med - b_med) / steps * 1000
        print(
            f"{name} {steps} steps: engine {e_med * 1000:.2f} ms, hand-written asyncio "
            f"{b_med * 1000:.2f} ms -> overhead {per_step_ms:.3f} ms/step "
            f"(goal <= 1 ms), engine/baseline ratio {e_med / b_med:.1f}x"
        )
        # Per step, so that the goal (<= 1 ms added per step) is the difference of the two.
        rows.append(
            Row(
                "engine_overhead",
                f"{name} ({steps} steps), time per step",
                e_med / steps * 1000,
                "ms/step",
                b_med / steps * 1000,
                "hand-written asyncio",
                Goal("<=", 1.0, "difference"),
            )
        )

    text = chain_yaml(100)
    samples = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        compile_yaml(text)
        samples.append(time.perf_counter() - start)
    med = statistics.median(samples)
    print(
        f"validate 100-step workflow: median {med * 1000:.1f} ms (goal < 100 ms, ratio to goal "
        f"{med / 0.1:.2f})"
    )
    rows.append(
        Row(
            "engine_overhead",
            "validate a 100-step workflow",
            med * 1000,
            "ms",
            goal=Goal("<=", 100.0, "ours"),
        )
    )
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
