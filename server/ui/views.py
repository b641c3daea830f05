"""What the pages show, shaped from the API's bodies (plain JSON values): a run's steps as
a tree (child steps nested under their step), a Gantt-like timeline of step durations, and
values as bounded, pretty JSON text. Pure functions: the handlers fetch, these shape, the
templates draw (Jinja autoescapes everything they print)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# A value shown on a page is cut at this many characters: a page stays readable and quick
# to render whatever a step produced (the API has the whole value).
MAX_SHOWN_CHARS = 20_000
# Child steps listed under one step (a for_each over thousands of items); the rest are
# counted, not drawn.
MAX_CHILDREN = 200
TIMELINE_W = 640  # px of the bar area
TIMELINE_ROW = 22
TIMELINE_LABEL_W = 180
# How deep child steps nest on a page (a workflow step calling one calling one ...).
MAX_DEPTH = 8


def shown(value: Any) -> str:
    """`value` as indented JSON (a string as itself), cut at MAX_SHOWN_CHARS."""
    text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
    if len(text) > MAX_SHOWN_CHARS:
        return text[:MAX_SHOWN_CHARS] + f"\n… ({len(text) - MAX_SHOWN_CHARS} more characters)"
    return text


def duration(ms: float | None) -> str:
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def when(text: str | None) -> str:
    """An ISO 8601 instant as the pages show it: "2026-05-27 10:41:07 UTC"."""
    moment = parse_time(text)
    if moment is None:
        return text or ""
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass
class StepView:
    id: str
    key: str  # the DOM key: the path joined by "/" (the step id for a top-level step)
    type: str
    status: str
    duration_ms: float | None
    started_at: str | None
    attempts: int
    model: str | None
    error: str | None
    notes: list[str]
    params: str | None  # the step's parameters as written in the workflow (templates)
    input: str | None  # the rendered inputs (include=io), once rendered
    output: str | None  # the step's output (include=io), once it has one
    children: list[StepView] = field(default_factory=list)
    more_children: int = 0


def _notes(entry: dict[str, Any]) -> list[str]:
    notes = []
    if entry.get("items") is not None:
        notes.append(f"{entry['items']} items")
    if entry.get("iterations") is not None:
        notes.append(f"{entry['iterations']} passes")
    if entry.get("until_met") is False:
        notes.append("stopped at max without meeting until")
    if (entry.get("attempts") or 0) > 1:
        notes.append(f"{entry['attempts']} attempts")
    if entry.get("mocked"):
        notes.append("mocked")
    return notes


# A step in one of these has its output (which may be null); before, it has none to show.
_ENDED = frozenset({"completed", "failed", "skipped"})


def _has_output(entry: dict[str, Any]) -> bool:
    """Whether the entry (from include=io) carries an output worth a <details>."""
    if "output" not in entry:
        return False
    return entry["output"] is not None or entry.get("status") in _ENDED


def step_view(
    entry: dict[str, Any],
    params: dict[str, Any] | None = None,
    parent_key: str = "",
    depth: int = 0,
) -> StepView:
    sid = str(entry.get("step", ""))
    path = entry.get("path")
    if isinstance(path, list) and path:
        key = "/".join(str(p) for p in path)
    else:
        key = f"{parent_key}/{sid}" if parent_key else sid
    raw_children = (entry.get("children") or []) if depth < MAX_DEPTH else []
    if isinstance(path, list) and path and isinstance(path[-1], int):
        sid = f"{sid} #{path[-1]}"  # a for_each item or a repeat pass: its index
    view = StepView(
        id=sid,
        key=key,
        type=str(entry.get("type", "")),
        status=str(entry.get("status", "pending")),
        duration_ms=entry.get("duration_ms"),
        started_at=entry.get("started_at"),
        attempts=int(entry.get("attempts") or 0),
        model=entry.get("model"),
        error=entry.get("error"),
        notes=_notes(entry),
        params=shown(params) if params else None,
        input=shown(entry["input"]) if entry.get("input") is not None else None,
        output=shown(entry["output"]) if _has_output(entry) else None,
        children=[step_view(child, None, key, depth + 1) for child in raw_children[:MAX_CHILDREN]],
        more_children=max(0, len(raw_children) - MAX_CHILDREN)
        + int(entry.get("children_omitted") or 0),
    )
    return view


def step_views(trace: list[dict[str, Any]], definition: dict[str, Any] | None) -> list[StepView]:
    """The run's top-level steps, each with its parameters from the workflow's definition
    (when known) and its children."""
    params: dict[str, dict[str, Any]] = {}
    for step in (definition or {}).get("steps") or []:
        if isinstance(step, dict) and "step_id" in step:
            params[str(step["step_id"])] = {k: v for k, v in step.items() if k != "step_id"}
    return [step_view(entry, params.get(str(entry.get("step")))) for entry in trace]


@dataclass(frozen=True)
class Bar:
    step: str
    key: str
    status: str
    y: int
    x: float
    width: float
    label: str  # the duration
    offset_ms: float | None  # from the first step's start (None: not started)
    duration_ms: float | None


@dataclass(frozen=True)
class Timeline:
    width: int
    height: int
    label_w: int
    row_h: int
    total_ms: float
    bars: list[Bar]
    bars_w: int = TIMELINE_W
    origin: datetime | None = None  # the first step's start


def timeline(trace: list[dict[str, Any]]) -> Timeline:
    """One bar per top-level step, from its start (relative to the first step's) for its
    duration; a step that has not started has no bar (its row stays, empty)."""
    starts = {e.get("step"): parse_time(e.get("started_at")) for e in trace}
    known = [t for t in starts.values() if t is not None]
    origin = min(known) if known else None
    spans: list[tuple[dict[str, Any], float | None, float]] = []
    for entry in trace:
        start = starts.get(entry.get("step"))
        offset = (start - origin).total_seconds() * 1000 if start and origin else None
        spans.append((entry, offset, float(entry.get("duration_ms") or 0.0)))
    total = max((o + d for _, o, d in spans if o is not None), default=0.0) or 1.0
    scale = TIMELINE_W / total
    bars = []
    for row, (entry, offset, ms) in enumerate(spans):
        sid = str(entry.get("step", ""))
        if offset is None:
            x, width = 0.0, 0.0
        else:
            x, width = round(offset * scale, 1), round(max(ms * scale, 2.0), 1)
        status = str(entry.get("status", "pending"))
        label = duration(entry.get("duration_ms"))
        bars.append(
            Bar(
                sid,
                sid,
                status,
                row * TIMELINE_ROW,
                x,
                width,
                label,
                offset,
                entry.get("duration_ms"),
            )
        )
    return Timeline(
        TIMELINE_LABEL_W + TIMELINE_W + 80,
        max(len(bars), 1) * TIMELINE_ROW,
        TIMELINE_LABEL_W,
        TIMELINE_ROW,
        total,
        bars,
        origin=origin,
    )


def run_duration(run: dict[str, Any]) -> str:
    return duration(run.get("total_latency_ms"))
