"""A workflow's DAG as a Mermaid flowchart."""

from __future__ import annotations

import networkx as nx

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.values import Literal


def _label(text: str) -> str:
    return text.replace('"', "#quot;")


def may_skip(wf: CompiledWorkflow) -> set[str]:
    """Steps that can end skipped: those with a `when` other than a true literal, and
    those downstream of one through unguarded dependencies (the skip propagates)."""
    skippable: set[str] = set()
    for sid in nx.topological_sort(wf.graph):
        step = wf.steps[sid]
        when = step.when
        own = when is not None and not (isinstance(when, Literal) and when.value)
        if own or any(d in skippable and d not in step.guarded for d in step.deps):
            skippable.add(sid)
    return skippable


def mermaid(wf: CompiledWorkflow) -> str:
    """Conditional steps are hexagons and the edges that may carry a skip are dashed;
    for_each and repeat are named on the node."""
    lines = ["flowchart TD"]
    skippable = may_skip(wf)
    for sid, step in wf.steps.items():
        notes = [step.type]
        if step.for_each is not None:
            notes.append(f"for each, {step.concurrency} at once")
        if step.repeat is not None:
            notes.append(f"repeat ≤ {step.repeat.max}")
        if step.on_error == "continue":
            notes.append("on error: continue")
        text = _label(f"{sid}<br/><small>{' · '.join(notes)}</small>")
        shape = ('{{"', '"}}') if step.when is not None else ('["', '"]')
        lines.append(f"  {sid}{shape[0]}{text}{shape[1]}")
    for dep, sid in wf.graph.edges:
        if dep in wf.steps[sid].guarded:
            lines.append(f"  {dep} -. if ran .-> {sid}")
        elif dep in skippable:
            lines.append(f"  {dep} -. skip propagates .-> {sid}")
        else:
            lines.append(f"  {dep} --> {sid}")
    return "\n".join(lines) + "\n"
