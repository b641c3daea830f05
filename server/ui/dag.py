"""A workflow's DAG laid out for an SVG drawn on the server: one column per topological
generation (a step sits right of everything it depends on), steps in a column in the
order the workflow lists them, edges as curves from a step's right side to a dependent's
left side. The template (templates/_dag.html) draws it; the run page's script colours the
nodes by their `data-step` ids as events arrive."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import networkx as nx

from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.graph import may_skip

NODE_W, NODE_H = 168, 44
GAP_X, GAP_Y = 56, 18
MARGIN = 8
LABEL_CHARS = 22  # what fits in NODE_W at the stylesheet's font size


@dataclass(frozen=True)
class Node:
    id: str
    label: str  # the id, shortened to fit the box (the full id is the node's title)
    type: str
    x: int
    y: int
    conditional: bool  # has a `when`: may end skipped


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: str  # SVG path data
    dashed: bool  # may carry a skip (a guarded or skippable dependency)


@dataclass(frozen=True)
class Layout:
    width: int
    height: int
    node_w: int
    node_h: int
    nodes: list[Node]
    edges: list[Edge]


def _short(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def layout(
    steps: Sequence[tuple[str, str]],
    edges: Iterable[tuple[str, str]] = (),
    *,
    conditional: frozenset[str] = frozenset(),
    dashed: frozenset[tuple[str, str]] = frozenset(),
) -> Layout:
    """`steps`: (id, type) in the workflow's order; `edges`: (dependency, dependent)."""
    graph: nx.DiGraph = nx.DiGraph()
    order = {sid: i for i, (sid, _) in enumerate(steps)}
    graph.add_nodes_from(order)
    graph.add_edges_from((a, b) for a, b in edges if a in order and b in order)
    types = dict(steps)
    position: dict[str, tuple[int, int]] = {}
    nodes: list[Node] = []
    tallest = 0
    for col, generation in enumerate(nx.topological_generations(graph)):
        ordered = sorted(generation, key=order.__getitem__)
        tallest = max(tallest, len(ordered))
        for row, sid in enumerate(ordered):
            x = MARGIN + col * (NODE_W + GAP_X)
            y = MARGIN + row * (NODE_H + GAP_Y)
            position[sid] = (x, y)
            nodes.append(Node(sid, _short(sid), types[sid], x, y, sid in conditional))
    columns = max((p[0] for p in position.values()), default=MARGIN) + NODE_W + MARGIN
    drawn: list[Edge] = []
    for a, b in graph.edges:
        (ax, ay), (bx, by) = position[a], position[b]
        x1, y1 = ax + NODE_W, ay + NODE_H // 2
        x2, y2 = bx, by + NODE_H // 2
        bend = (x2 - x1) // 2
        path = f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"
        drawn.append(Edge(a, b, path, (a, b) in dashed))
    height = 2 * MARGIN + max(tallest, 1) * (NODE_H + GAP_Y) - GAP_Y
    return Layout(columns, height, NODE_W, NODE_H, nodes, drawn)


def workflow_layout(wf: CompiledWorkflow) -> Layout:
    """A compiled workflow's DAG: conditional steps marked, edges that may carry a skip
    dashed (as `fusion graph`'s Mermaid draws them, engine/dsl/graph.py)."""
    skippable = may_skip(wf)
    dashed = frozenset(
        (dep, sid)
        for dep, sid in wf.graph.edges
        if dep in wf.steps[sid].guarded or dep in skippable
    )
    return layout(
        [(sid, step.type) for sid, step in wf.steps.items()],
        wf.graph.edges,
        conditional=frozenset(sid for sid, s in wf.steps.items() if s.when is not None),
        dashed=dashed,
    )


def trace_layout(steps: Sequence[tuple[str, str]]) -> Layout:
    """The steps of a run whose workflow is no longer known (deleted, or changed since):
    one column in trace order, without edges."""
    return layout(steps)
