"""A run's progress on the terminal, from a server's events or an in-process run's."""

from __future__ import annotations

from typing import Any, TextIO


class Progress:
    """A run's events as lines on a stream (stderr): each step as it starts and ends, and
    the tokens of chat steps as they arrive."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.mid_line = False  # tokens were written since the last line ended

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        if name == "token":
            delta = str(data.get("delta", ""))
            self.stream.write(delta)
            self.mid_line = not delta.endswith("\n") if delta else self.mid_line
        elif name == "step_started":
            self.line(f"{_indent(data)}> {_label(data)} ({data.get('type')})")
        elif name == "step_finished":
            self.line(_indent(data) + self.finished(data))
        self.stream.flush()

    @staticmethod
    def finished(data: dict[str, Any]) -> str:
        text = f"< {_label(data)} {data.get('status')}"
        if data.get("duration_ms") is not None:
            text += f" in {data['duration_ms']:.1f} ms"
        why = data.get("error") or data.get("reason")
        return f"{text}: {why}" if why else text

    def line(self, text: str) -> None:
        self.end()
        self.stream.write(text + "\n")

    def end(self) -> None:
        """End a line of tokens."""
        if self.mid_line:
            self.stream.write("\n")
            self.stream.flush()
            self.mid_line = False


def _indent(data: dict[str, Any]) -> str:
    """Two spaces per level below the top run: a child step's `path` has its parents."""
    path = data.get("path")
    return "  " * (len(path) - 1) if isinstance(path, list) and path else ""


def _label(data: dict[str, Any]) -> str:
    """The step's id; a for_each item's or repeat pass's with its index (`split[2]`)."""
    path = data.get("path")
    label = str(data.get("step_id"))
    if isinstance(path, list) and path and isinstance(path[-1], int):
        return f"{label}[{path[-1]}]"
    return label
