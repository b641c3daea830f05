"""Markdown, header-aware: ATX and setext headings start sections, fenced code is kept
verbatim, front matter is dropped (its title kept), inline markup is lightly stripped."""

from __future__ import annotations

import re
from typing import Any

from engine.rag.formats.common import HeadingPath, SectionList
from engine.rag.formats.text import decode
from engine.rag.types import Extracted, Section

# CommonMark: at most three spaces of indent (four make an indented code block).
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_REF_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*\S")
_BLOCK_START = re.compile(r"^ {0,3}(?:[-+*]|\d{1,9}[.)]|>)(?:[ \t]|$)")
_THEMATIC_BREAK = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_TABLE_RULE = re.compile(r"^ {0,3}\|?(?:[ \t]*:?-+:?[ \t]*\|)+(?:[ \t]*:?-+:?[ \t]*)?$")

_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)|!\[([^\]]*)\]\[[^\]]*\]")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)|\[([^\]]+)\]\[[^\]]*\]")
_AUTOLINK = re.compile(r"<((?:https?|ftp|mailto):[^>\s]+)>")
_STRONG = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
# `_` emphasis only at word boundaries, so snake_case identifiers survive.
_EMPHASIS = re.compile(r"\*(?=\S)(.+?)(?<=\S)\*|(?<!\w)_(?=\S)(.+?)(?<=\S)_(?!\w)")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_MARKUP = re.compile(r"[`*_\[!<~]")  # lines without these need no stripping


def extract_markdown(data: bytes, charset: str | None = None) -> Extracted:
    text = decode(data, charset).replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    front_title, lines = _front_matter(lines)
    sections, first_h1 = _split(lines)
    return Extracted(format="markdown", title=front_title or first_h1, sections=sections)


def _front_matter(lines: list[str]) -> tuple[str | None, list[str]]:
    """Drop a leading `---` YAML block; return its `title` if it has one."""
    if not lines or lines[0].strip() != "---":
        return None, lines
    for end in range(1, len(lines)):
        if lines[end].strip() in ("---", "..."):
            return _yaml_title("\n".join(lines[1:end])), lines[end + 1 :]
    return None, lines  # no closing delimiter: an ordinary thematic break


def _yaml_title(block: str) -> str | None:
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        meta: Any = YAML(typ="safe", pure=True).load(block)
    except YAMLError:
        return None  # malformed front matter is still front matter: dropped, no title
    title = meta.get("title") if isinstance(meta, dict) else None
    return (str(title).strip() or None) if title is not None else None


def _split(lines: list[str]) -> tuple[list[Section], str | None]:
    sections = SectionList()
    path = HeadingPath()
    body: list[str] = []
    paragraph: list[str] = []  # lines of the open paragraph: a setext heading's text
    first_h1: str | None = None
    fence: str | None = None

    def start_section(level: int, title: str) -> None:
        nonlocal first_h1
        sections.add("\n".join(body), path.path())
        body.clear()
        path.enter(level, title)
        if level == 1 and first_h1 is None:
            first_h1 = title

    for line in lines:
        if fence is not None:
            # Inside a fence everything is code, '#' included; it closes on a fence of
            # the same character at least as long.
            stripped = line.strip()
            if stripped.startswith(fence) and not stripped.strip(fence[0]):
                fence = None
            else:
                body.append(line)
            continue
        opened = _FENCE.match(line)
        if opened:
            fence, paragraph = opened.group(1), []
            continue
        atx = _ATX.match(line)
        if atx:
            paragraph = []
            title = strip_inline(atx.group(2) or "").strip()
            if title:  # an empty heading (a lone '#') names nothing
                start_section(len(atx.group(1)), title)
            continue
        setext = _SETEXT.match(line)
        if setext and paragraph:
            # The paragraph just read was the heading's text, not body.
            title = strip_inline(" ".join(p.strip() for p in paragraph))
            del body[len(body) - len(paragraph) :]
            paragraph = []
            start_section(1 if setext.group(1)[0] == "=" else 2, title)
            continue
        if _REF_DEFINITION.match(line) or _TABLE_RULE.match(line):
            continue  # `[id]: https://...` and `|---|---|` are plumbing, not text
        if _THEMATIC_BREAK.match(line):
            paragraph = []
            body.append("")
            continue
        if not line.strip() or _BLOCK_START.match(line):
            paragraph = []  # a blank line ends a paragraph; list items and quotes are none
        else:
            paragraph.append(line)
        body.append(strip_inline(line))
    sections.add("\n".join(body), path.path())
    return sections.sections, first_h1


def strip_inline(text: str) -> str:
    """Links keep their text, images their alt text; emphasis and code markers go.
    Code spans are left as they are inside."""
    if not _MARKUP.search(text):
        return text
    parts = _CODE_SPAN.split(text)
    # split() yields [text, ticks, code, text, ticks, code, ..., text].
    out: list[str] = []
    for i in range(0, len(parts), 3):
        out.append(_strip_markup(parts[i]))
        if i + 2 < len(parts):
            out.append(parts[i + 2])
    return "".join(out)


def _strip_markup(text: str) -> str:
    text = _IMAGE.sub(lambda m: m.group(1) or m.group(2) or "", text)
    text = _LINK.sub(lambda m: m.group(1) or m.group(2), text)
    text = _AUTOLINK.sub(r"\1", text)
    text = _STRONG.sub(r"\2", text)
    text = _EMPHASIS.sub(lambda m: m.group(1) or m.group(2), text)
    return _STRIKE.sub(r"\1", text)
