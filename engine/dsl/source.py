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
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    ScalarEvent,
)
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from engine.config import Settings
from engine.dsl.issues import Issue, Path, WorkflowInvalid

Position = tuple[int, int]  # 1-based line, column


@dataclass(frozen=True)
class DocumentLimits:
    """What one workflow document may hold. Workflow files are untrusted input (`fusion
    validate` runs on pull requests): a few hundred bytes of nested YAML aliases would
    otherwise expand to gigabytes, and deep nesting would overflow the C stack."""

    max_bytes: int
    max_depth: int
    max_nodes: int  # every scalar, list and mapping, keys included, aliases as expanded

    @classmethod
    def from_settings(cls, settings: Settings) -> DocumentLimits:
        return cls(
            max_bytes=settings.workflow_max_bytes,
            max_depth=settings.workflow_max_depth,
            max_nodes=settings.workflow_max_nodes,
        )


# Settings' defaults until configure() installs the server's own; `fusion validate` keeps
# these, so a fusion.yaml inside the checkout it checks cannot lift them.
_limits = DocumentLimits.from_settings(Settings())


def configure(settings: Settings) -> None:
    global _limits
    _limits = DocumentLimits.from_settings(settings)


def current_limits() -> DocumentLimits:
    return _limits


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


class _Refused(MarkedYAMLError):
    """Well-formed YAML the loader will not take: over a limit, or a value its tag refuses."""


def load_text(text: str, file: str | None = None, limits: DocumentLimits | None = None) -> Document:
    """Parse YAML (JSON is accepted as the YAML subset it is) into plain Python values."""
    limits = limits or _limits
    # Characters never outnumber UTF-8 bytes, so only a text that might fit is encoded.
    try:
        size = len(text) if len(text) > limits.max_bytes else len(text.encode())
    except UnicodeEncodeError as exc:
        # A lone surrogate, as a JSON "\ud800" escape decodes: the C parser would raise
        # this same error from inside, unlocated.
        line = text.count("\n", 0, exc.start) + 1
        col = exc.start - text.rfind("\n", 0, exc.start)
        message = f"text is not valid Unicode: {exc.reason}"
        raise WorkflowInvalid([Issue(message, (), file, line, col)]) from None
    _check_size(size, file, limits)
    doc = Document(data=None, file=file, values={(): (1, 1)})
    try:
        yaml = _yaml()
        _check_events(yaml, text, limits)
        node = yaml.compose(text)
        doc.data = None if node is None else _Builder(doc, yaml.constructor).build(node, ())
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        # libyaml reports an unclosed bracket or quote at the end of the input; where
        # it was opened is the useful place.
        if exc.context_mark and mark and mark.index >= len(text.rstrip()):
            mark = exc.context_mark
        # "while parsing a block mapping: did not find expected key" reads as two parts.
        problem = ": ".join(p for p in (exc.context, exc.problem) if p) or str(exc)
        prefix = "" if isinstance(exc, _Refused) else "YAML syntax error: "
        where = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise WorkflowInvalid([Issue(prefix + problem, (), file, *where)]) from None
    except YAMLError as exc:
        raise WorkflowInvalid([Issue(f"YAML error: {exc}", (), file)]) from None
    return doc


def _check_size(size: int, file: str | None, limits: DocumentLimits) -> None:
    if size > limits.max_bytes:
        message = (
            f"document is {size} bytes, over the limit of {limits.max_bytes} "
            "(setting workflow_max_bytes)"
        )
        raise WorkflowInvalid([Issue(message, (), file, 1, 1)])


class _Frame:
    __slots__ = ("anchor", "first", "height")

    def __init__(self, anchor: str | None, first: int) -> None:
        self.anchor = anchor
        self.first = first  # the node count before this collection started
        self.height = 0  # of its tallest child


def _check_events(yaml: YAML, text: str, limits: DocumentLimits) -> None:
    """Walk the parse events once, before anything is composed, and refuse a document
    that nests deeper or expands to more nodes than the limits allow.

    An anchored node's size and height are recorded when it ends, so an alias adds its
    expanded size without being expanded: the walk is linear in the text however aliases
    multiply. It must come first because the composer recurses in C, where deep nesting
    is a segmentation fault rather than an exception."""
    stack: list[_Frame] = []
    anchored: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, height)
    nodes = 0

    def add(size: int, height: int, mark: Any, what: str) -> None:
        nonlocal nodes
        nodes += size
        if len(stack) + height > limits.max_depth:
            raise _Refused(
                problem=f"{what} nests deeper than {limits.max_depth} levels "
                "(setting workflow_max_depth)",
                problem_mark=mark,
            )
        if nodes > limits.max_nodes:
            raise _Refused(
                problem=f"{what} takes the document past {limits.max_nodes} values "
                "(setting workflow_max_nodes; an alias counts as a copy of its anchor)",
                problem_mark=mark,
            )
        if stack:
            stack[-1].height = max(stack[-1].height, height)

    for event in yaml.parse(text):
        if isinstance(event, AliasEvent):
            if any(f.anchor == event.anchor for f in stack):
                raise _Refused(
                    problem=f"alias *{event.anchor} refers to a value that contains it",
                    problem_mark=event.start_mark,
                )
            # An undefined anchor counts as one value; the composer reports it.
            size, height = anchored.get(event.anchor, (1, 1))
            add(size, height, event.start_mark, f"alias *{event.anchor}")
        elif isinstance(event, ScalarEvent):
            add(1, 1, event.start_mark, "this value")
            if event.anchor is not None:
                anchored[event.anchor] = (1, 1)
        elif isinstance(event, CollectionStartEvent):
            add(1, 1, event.start_mark, "this value")
            stack.append(_Frame(event.anchor, nodes - 1))
        elif isinstance(event, CollectionEndEvent):
            frame = stack.pop()
            height = frame.height + 1
            if stack:
                stack[-1].height = max(stack[-1].height, height)
            if frame.anchor is not None:
                anchored[frame.anchor] = (nodes - frame.first, height)


class _Builder:
    """Node tree -> plain values, recording each key's and value's position. Only for a
    tree that passed _check_events: it recurses, and copies every alias out in full."""

    def __init__(self, doc: Document, scalars: SafeConstructor) -> None:
        self.doc = doc
        self.scalars = scalars

    def build(self, node: Node, path: Path) -> Any:
        if isinstance(node, MappingNode):
            return self.mapping(node, path)
        if isinstance(node, SequenceNode):
            items = []
            for i, child in enumerate(node.value):
                self.doc.values[(*path, i)] = _pos(child)
                items.append(self.build(child, (*path, i)))
            return items
        return self.scalar(node)

    def scalar(self, node: Node) -> Any:
        try:
            return self.scalars.construct_object(node, deep=True)
        except (ValueError, LookupError, TypeError, ArithmeticError) as exc:
            # An explicit tag the text does not fit (`!!int abc`, `!!bool maybe`, an empty
            # `!!int`), a date that does not exist, an integer past Python's digit limit:
            # ruamel's constructors fail with whatever their parsing code raised.
            tag = (node.tag or "").removeprefix("tag:yaml.org,2002:")
            why = "not a valid value" if isinstance(exc, LookupError) else str(exc)
            raise _Refused(
                problem=f"cannot read {node.value[:40]!r} as {tag}: {why}",
                problem_mark=node.start_mark,
            ) from None

    def mapping(self, node: MappingNode, path: Path) -> dict[str, Any]:
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
            key = str(self.scalar(key_node))
            if key in out:
                first = self.doc.keys.get((*path, key))
                at = f" (first at line {first[0]})" if first else ""
                raise MarkedYAMLError(
                    problem=f'duplicate key "{key}"{at}', problem_mark=key_node.start_mark
                )
            child = (*path, key)
            self.doc.keys[child] = _pos(key_node)
            self.doc.values[child] = _pos(value_node)
            out[key] = self.build(value_node, child)
        for value_node in merges:
            # Built aside, so the merged-in mapping's positions cannot overwrite those of
            # keys this mapping sets itself.
            scratch = Document(data=None, file=self.doc.file)
            merged = _Builder(scratch, self.scalars).build(value_node, path)
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


def load_file(path: str | FsPath, limits: DocumentLimits | None = None) -> Document:
    p = FsPath(path)
    limits = limits or _limits
    try:
        # Sized before reading, so a huge file is refused without loading it.
        _check_size(p.stat().st_size, str(p), limits)
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowInvalid([Issue(f"cannot read file: {exc}", (), str(p))]) from None
    return load_text(text, str(p), limits)


def from_object(
    data: Mapping[str, Any], file: str | None = None, limits: DocumentLimits | None = None
) -> Document:
    """A document that arrived already parsed: issues are located by JSON pointer only."""
    return Document(data=_Plain(limits or _limits, file).copy(data, ()), file=file)


class _Plain:
    """Copy an already-parsed object into plain dict/list values with string keys, held to
    the same depth and size limits as a YAML document."""

    def __init__(self, limits: DocumentLimits, file: str | None) -> None:
        self.limits = limits
        self.file = file
        self.nodes = 0

    def copy(self, node: Any, path: Path) -> Any:
        self.nodes += 1
        problem = None
        if len(path) >= self.limits.max_depth:
            problem = (
                f"nests deeper than {self.limits.max_depth} levels (setting workflow_max_depth)"
            )
        elif self.nodes > self.limits.max_nodes:
            problem = (
                f"takes the document past {self.limits.max_nodes} values "
                "(setting workflow_max_nodes)"
            )
        if problem:
            raise WorkflowInvalid([Issue(problem, path, self.file)])
        if isinstance(node, Mapping):
            self.nodes += len(node)  # the keys, as a YAML document counts them
            return {str(k): self.copy(v, (*path, str(k))) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [self.copy(v, (*path, i)) for i, v in enumerate(node)]
        return node
