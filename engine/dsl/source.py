"""Load a workflow document from YAML or JSON text, or take one already parsed (the compose
API's body), keeping where every key and value came from so issues can name line and column."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from engine.dsl.issues import Issue, Path, WorkflowInvalid

Position = tuple[int, int]  # 1-based line, column


@dataclass
class Document:
    data: Any
    file: str | None = None
    keys: dict[Path, Position] = field(default_factory=dict)
    values: dict[Path, Position] = field(default_factory=dict)

    def issue(self, message: str, path: Path, *, at_key: bool = False) -> Issue:
        """An issue located at ``path``: its key when ``at_key`` (an unknown key), else its
        value; the nearest located ancestor when the path itself has no position."""
        table = self.keys if at_key else self.values
        probe = path
        while probe:
            pos = table.get(probe) or self.keys.get(probe)
            if pos:
                return Issue(message, path, self.file, *pos)
            probe = probe[:-1]
        pos = self.values.get(())
        return Issue(message, path, self.file, *(pos or (None, None)))


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    return yaml


def load_text(text: str, file: str | None = None) -> Document:
    """Parse YAML (JSON is accepted as the YAML subset it is) into plain Python values."""
    try:
        raw = _yaml().load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or str(exc)
        raise WorkflowInvalid(
            [Issue(f"YAML syntax error: {problem}", (), file, line, col)]
        ) from None
    except YAMLError as exc:
        raise WorkflowInvalid([Issue(f"YAML error: {exc}", (), file)]) from None
    doc = Document(data=None, file=file, values={(): (1, 1)})
    doc.data = _plain(raw, (), doc)
    return doc


def load_file(path: str | FsPath) -> Document:
    p = FsPath(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowInvalid([Issue(f"cannot read file: {exc}", (), str(p))]) from None
    return load_text(text, str(p))


def from_object(data: Mapping[str, Any], file: str | None = None) -> Document:
    """A document that arrived already parsed: issues are located by JSON pointer only."""
    return Document(data=_plain(data, (), None), file=file)


def _plain(node: Any, path: Path, doc: Document | None) -> Any:
    """Convert ruamel's round-trip types to plain dict/list/str, recording positions."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            child = (*path, str(key))
            if doc is not None and isinstance(node, CommentedMap):
                kl, kc, vl, vc = node.lc.data[key]
                doc.keys[child] = (kl + 1, kc + 1)
                doc.values[child] = (vl + 1, vc + 1)
            out[str(key)] = _plain(value, child, doc)
        return out
    if isinstance(node, list | tuple):
        items = []
        for i, value in enumerate(node):
            child = (*path, i)
            if doc is not None and isinstance(node, CommentedSeq):
                line, col = node.lc.data[i]
                doc.values[child] = (line + 1, col + 1)
            items.append(_plain(value, child, doc))
        return items
    if isinstance(node, str):
        return str(node)
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    return node
