"""A workflow's DAG as a Mermaid flowchart."""

from __future__ import annotations

from engine.dsl.compiler import CompiledWorkflow


def _label(text: str) -> str:
    return text.replace('"', "#quot;")


def mermaid(wf: CompiledWorkflow) -> str:
    """Conditional steps are hexagons and the edges that may carry a skip are dashed;
    for_each and repeat are named on the node."""
    lines = ["flowchart TD"]
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
        source, target = wf.steps[dep], wf.steps[sid]
        if dep in target.guarded:
            lines.append(f"  {dep} -. if ran .-> {sid}")
        elif source.when is not None:
            lines.append(f"  {dep} -. skip propagates .-> {sid}")
        else:
            lines.append(f"  {dep} --> {sid}")
    return "\n".join(lines) + "\n"
