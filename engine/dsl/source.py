"""Load a workflow document from YAML or JSON text, or take one already parsed (the compose
API's body), keeping where every key and value came from so issues can name line and column."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import SafeConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

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
    # The "safe" composer uses ruamel's C parser when ruamel.yaml.clib is installed (about
    # ten times faster than the round-trip one) and its nodes still carry line and column.
    return YAML(typ="safe")


def load_text(text: str, file: str | None = None) -> Document:
    """Parse YAML (JSON is accepted as the YAML subset it is) into plain Python values."""
    doc = Document(data=None, file=file, values={(): (1, 1)})
    try:
        yaml = _yaml()
        node = yaml.compose(text)
        doc.data = None if node is None else _Builder(doc, yaml.constructor).build(node, ())
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        # libyaml reports an unclosed bracket or quote at the end of the input; where
        # it was opened is the useful place.
        if exc.context_mark and mark and mark.index >= len(text.rstrip()):
            mark = exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        # "while parsing a block mapping: did not find expected key" reads as two parts.
        problem = ": ".join(p for p in (exc.context, exc.problem) if p) or str(exc)
        issue = Issue(f"YAML syntax error: {problem}", (), file, line, col)
        raise WorkflowInvalid([issue]) from None
    except YAMLError as exc:
        raise WorkflowInvalid([Issue(f"YAML error: {exc}", (), file)]) from None
    return doc


class _Builder:
    """Node tree -> plain values, recording each key's and value's position."""

    MAX_DEPTH = 200  # aliases can make a node its own descendant

    def __init__(self, doc: Document, scalars: SafeConstructor) -> None:
        self.doc = doc
        self.scalars = scalars

    def build(self, node: Node, path: Path, depth: int = 0) -> Any:
        if depth > self.MAX_DEPTH:
            raise MarkedYAMLError(
                problem="nesting too deep (recursive alias?)", problem_mark=node.start_mark
            )
        if isinstance(node, MappingNode):
            return self.mapping(node, path, depth)
        if isinstance(node, SequenceNode):
            items = []
            for i, child in enumerate(node.value):
                self.doc.values[(*path, i)] = _pos(child)
                items.append(self.build(child, (*path, i), depth + 1))
            return items
        return self.scalars.construct_object(node, deep=True)

    def mapping(self, node: MappingNode, path: Path, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        merges = []
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merges.append(value_node)  # applied last: the mapping's own keys win
                continue
            if not isinstance(key_node, ScalarNode):
                raise MarkedYAMLError(
                    problem="mapping keys must be plain scalars", problem_mark=key_node.start_mark
                )
            key = str(self.scalars.construct_object(key_node))
            if key in out:
                first = self.doc.keys.get((*path, key))
                at = f" (first at line {first[0]})" if first else ""
                raise MarkedYAMLError(
                    problem=f'duplicate key "{key}"{at}', problem_mark=key_node.start_mark
                )
            child = (*path, key)
            self.doc.keys[child] = _pos(key_node)
            self.doc.values[child] = _pos(value_node)
            out[key] = self.build(value_node, child, depth + 1)
        for value_node in merges:
            # Built aside, so the merged-in mapping's positions cannot overwrite those of
            # keys this mapping sets itself.
            scratch = Document(data=None, file=self.doc.file)
            merged = _Builder(scratch, self.scalars).build(value_node, path, depth + 1)
            for part in merged if isinstance(merged, list) else [merged]:
                if not isinstance(part, dict):
                    continue
                new = {k: v for k, v in part.items() if k not in out}
                out.update(new)
                for table, source in (
                    (self.doc.keys, scratch.keys),
                    (self.doc.values, scratch.values),
                ):
                    table.update(
                        (p, pos)
                        for p, pos in source.items()
                        if len(p) > len(path) and p[len(path)] in new
                    )
        return out


def _pos(node: Node) -> Position:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


def load_file(path: str | FsPath) -> Document:
    p = FsPath(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowInvalid([Issue(f"cannot read file: {exc}", (), str(p))]) from None
    return load_text(text, str(p))


def from_object(data: Mapping[str, Any], file: str | None = None) -> Document:
    """A document that arrived already parsed: issues are located by JSON pointer only."""
    return Document(data=_plain(data), file=file)


def _plain(node: Any) -> Any:
    """Copy an already-parsed object into plain dict/list values with string keys."""
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_plain(v) for v in node]
    return node
