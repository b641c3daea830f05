"""Markdown, header-aware: ATX and setext headings start sections, fenced code is kept
verbatim, front matter is dropped (its title kept), inline markup is lightly stripped."""

from __future__ import annotations

import re
from typing import Any

from engine.rag.formats.common import ExtractLimits, HeadingPath, SectionList
from engine.rag.formats.text import decode
from engine.rag.types import Extracted, Section

# CommonMark: at most three spaces of indent (four make an indented code block).
# The closing `#` sequence is removed in code (`_atx_title`): a pattern for it backtracks
# over every run of spaces, quadratic on a long heading line.
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*))?$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_REF_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*\S")
_BLOCK_START = re.compile(r"^ {0,3}(?:[-+*]|\d{1,9}[.)]|>)(?:[ \t]|$)")
_THEMATIC_BREAK = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_TABLE_RULE = re.compile(r"^ {0,3}\|?(?:[ \t]*:?-+:?[ \t]*\|)+(?:[ \t]*:?-+:?[ \t]*)?$")

# Every inline pattern is linear: a delimited run may not contain its own opening
# delimiter, so a match attempt ends at the next opener and each character is scanned by a
# bounded number of attempts. (With `.+?` or `[^\]]+`, a line of 50,000 `[` or `**a`
# cost quadratic time: 17 s for 50 KB.) Code spans are found by `_code_spans`, not a
# pattern, for the same reason.
_TICKS = re.compile(r"`+")
_IMAGE = re.compile(r"!\[([^\[\]]*)\]\([^()]*\)|!\[([^\[\]]*)\]\[[^\[\]]*\]")
_LINK = re.compile(r"\[([^\[\]]+)\]\([^()]*\)|\[([^\[\]]+)\]\[[^\[\]]*\]")
_AUTOLINK = re.compile(r"<((?:https?|ftp|mailto):[^<>\s]+)>")
_STRONG = re.compile(
    r"\*\*(?=\S)((?:[^*]|\*(?!\*))+?)(?<=\S)\*\*|__(?=\S)((?:[^_]|_(?!_))+?)(?<=\S)__"
)
# `_` emphasis only at word boundaries, so snake_case identifiers survive.
_EMPHASIS = re.compile(r"\*(?=\S)([^*]+?)(?<=\S)\*|(?<!\w)_(?=\S)([^_]+?)(?<=\S)_(?!\w)")
_STRIKE = re.compile(r"~~(?=\S)((?:[^~]|~(?!~))+?)(?<=\S)~~")
_MARKUP = re.compile(r"[`*_\[!<~]")  # lines without these need no stripping


def extract_markdown(data: bytes, limits: ExtractLimits, charset: str | None = None) -> Extracted:
    text = decode(data, charset).replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    front_title, lines = _front_matter(lines)
    sections, first_h1 = _split(lines, limits.max_chars)
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
    # Only a scalar is a title: str() of a list built from YAML aliases expands them all.
    if isinstance(title, bool) or not isinstance(title, str | int | float):
        return None
    return str(title).strip() or None


def _split(lines: list[str], max_chars: int) -> tuple[list[Section], str | None]:
    sections = SectionList(max_chars)
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
            title = strip_inline(_atx_title(atx.group(2) or ""))
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
    out: list[str] = []
    at = 0
    for start, end, code_start, code_end in _code_spans(text):
        out.append(_strip_markup(text[at:start]))
        out.append(text[code_start:code_end])
        at = end
    out.append(_strip_markup(text[at:]))
    return "".join(out)


def _code_spans(text: str) -> list[tuple[int, int, int, int]]:
    """(start, end, code start, code end) of each code span: a backtick run closed by the
    next run of the same length (CommonMark), found in one pass over the runs."""
    runs = [match.span() for match in _TICKS.finditer(text)]
    closer: list[int | None] = [None] * len(runs)
    next_of_length: dict[int, int] = {}
    for i in range(len(runs) - 1, -1, -1):
        length = runs[i][1] - runs[i][0]
        closer[i] = next_of_length.get(length)
        next_of_length[length] = i
    spans = []
    i = 0
    while i < len(runs):
        j = closer[i]
        if j is None:
            i += 1  # an unmatched run is literal backticks
            continue
        spans.append((runs[i][0], runs[j][1], runs[i][1], runs[j][0]))
        i = j + 1
    return spans


def _atx_title(raw: str) -> str:
    """The heading text without its optional closing sequence of `#`s."""
    title = raw.strip()
    bare = title.rstrip("#")
    if bare != title and (not bare or bare[-1] in " \t"):
        title = bare.rstrip()
    return title


def _strip_markup(text: str) -> str:
    text = _IMAGE.sub(lambda m: m.group(1) or m.group(2) or "", text)
    text = _LINK.sub(lambda m: m.group(1) or m.group(2), text)
    text = _AUTOLINK.sub(r"\1", text)
    text = _STRONG.sub(lambda m: m.group(1) or m.group(2), text)
    text = _EMPHASIS.sub(lambda m: m.group(1) or m.group(2), text)
    return _STRIKE.sub(r"\1", text)
