"""HTML through selectolax's lexbor parser: page chrome dropped, headings become sections,
block elements paragraphs, lists and table rows one line each."""

from __future__ import annotations

import re

from selectolax.lexbor import LexborHTMLParser, LexborNode

from engine.rag.formats.common import ExtractLimits, HeadingPath, LimitExceeded, SectionList
from engine.rag.formats.text import decode
from engine.rag.types import Extracted, Section

# Never content: code, styling, chrome, widgets, and what the author hid from readers.
_DROP = (
    "script, style, noscript, nav, aside, form, svg, iframe, template, object, embed, "
    "[role~=navigation i], [role~=banner i], [role~=contentinfo i], "
    "[aria-hidden=true i], [hidden]"
)
# <header>/<footer> are the page's banner and footer only outside sectioning content
# (HTML-ARIA mapping); an article's own <header> usually holds its <h1>, which we keep.
_SECTIONING = frozenset({"article", "main", "section"})
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
# fmt: off
_BLOCKS = frozenset({
    "address", "article", "blockquote", "body", "caption", "center", "details", "dialog",
    "dir", "div", "dl", "dd", "dt", "fieldset", "figcaption", "figure", "footer", "header",
    "hgroup", "hr", "html", "legend", "li", "main", "menu", "ol", "p", "pre", "section",
    "summary", "table", "tbody", "thead", "tfoot", "tr", "ul",
})
# fmt: on
# For `check_depth`: elements that never hold others (void), whose end tag may be omitted
# (the next sibling closes them), and whose content is text, not markup.
# fmt: off
_NO_NESTING = frozenset({
    "area", "base", "basefont", "bgsound", "br", "col", "embed", "frame", "hr", "img",
    "input", "keygen", "link", "meta", "param", "source", "track", "wbr",
    "p", "li", "dt", "dd", "rb", "rp", "rt", "rtc", "optgroup", "option", "colgroup",
    "caption", "thead", "tbody", "tfoot", "tr", "td", "th", "html", "head", "body",
})
_RAW_TEXT = frozenset({
    "script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes",
    "noscript", "plaintext",
})
# fmt: on
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9:-]*)")
# The end tag of each raw-text element, in any ASCII case (as the parser matches it).
_RAW_TEXT_END = {name: re.compile(f"</{name}", re.IGNORECASE | re.ASCII) for name in _RAW_TEXT}
_SPACE = re.compile(r"\s+")  # \s covers &nbsp; (U+00A0) in str patterns
_META_CHARSET = re.compile(rb"""<meta[^<>]+charset\s*=\s*["']?\s*([\w.:-]+)""", re.IGNORECASE)


def extract_html(data: bytes, limits: ExtractLimits, charset: str | None = None) -> Extracted:
    declared = _META_CHARSET.search(data[:4096])
    html = decode(data, charset or (declared.group(1).decode("ascii") if declared else None))
    check_depth(html, limits.max_html_depth)
    tree = LexborHTMLParser(html)
    title = _text_of(tree.css_first("head > title"))
    _strip_chrome(tree)
    # Fallbacks only after the chrome is gone: an <svg> has <title>s, a site banner an <h1>.
    title = title or _text_of(tree.css_first("title")) or _text_of(tree.css_first("h1"))
    root = tree.body or tree.root
    sections = _Walker(limits.max_chars).walk(root) if root is not None else []
    return Extracted(format="html", title=title or None, sections=sections)


def _strip_chrome(tree: LexborHTMLParser) -> None:
    # Unlink without destroying (recursive=False): matches can be nested, and destroying
    # an outer match would free inner matches we still hold. The document owns the memory.
    for node in tree.css(_DROP):
        node.decompose(recursive=False)
    for node in tree.css("header, footer"):
        parent = node.parent
        while parent is not None and parent.tag not in _SECTIONING:
            parent = parent.parent
        if parent is None:
            node.decompose(recursive=False)


def _text_of(node: LexborNode | None) -> str:
    return _collapse(node.text(deep=True, separator=" ")) if node is not None else ""


def _collapse(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


class _Walker:
    """Depth-first walk with an explicit stack (deep markup must not hit the recursion
    limit) that emits paragraphs into the current heading's section."""

    def __init__(self, max_chars: int) -> None:
        self.sections = SectionList(max_chars)
        self.ol_counts: list[int] = []  # items seen so far in each open <ol>
        self.path = HeadingPath()
        self.blocks: list[str] = []  # finished paragraphs/lines of the current section
        self.inline: list[str] = []  # text of the paragraph being read
        self.prefix = ""  # list marker waiting for the first text of a list item
        self.pre_depth = 0
        self.item_depth = 0  # open <li>: their paragraphs are lines of one list
        self.in_lines = False  # the last block was a list item or table row

    def walk(self, root: LexborNode) -> list[Section]:
        # Stack entries: (node, None) to enter, (node, "exit") after its children.
        stack: list[tuple[LexborNode, str | None]] = [(root, None)]
        while stack:
            node, action = stack.pop()
            if action == "exit":
                self._leave(node)
                continue
            tag = node.tag
            if tag == "-text":
                self._text(node.text_content or "")
                continue
            if tag in _HEADINGS:
                self._heading(_HEADINGS[tag], node)
                continue
            if tag == "tr":
                self._row(node)
                continue
            if tag == "br":
                self.inline.append("\n")
                continue
            if tag in ("-comment", "head", "title", "meta", "link"):
                continue
            self._enter(node)
            stack.append((node, "exit"))
            children: list[LexborNode] = []
            child = node.child
            while child is not None:
                children.append(child)
                child = child.next
            stack.extend((c, None) for c in reversed(children))
        self._flush()
        self.sections.add("\n".join(self.blocks), self.path.path())
        return self.sections.sections

    def _enter(self, node: LexborNode) -> None:
        tag = node.tag
        if tag in _BLOCKS:
            self._flush()
        if tag == "pre":
            self.pre_depth += 1
        elif tag == "ol":
            self.ol_counts.append(0)
        elif tag == "li":
            parent = node.parent
            marker = "-"
            if parent is not None and parent.tag == "ol" and self.ol_counts:
                # Counted as the walk meets them: asking each item for its position
                # among its siblings is quadratic in a long list.
                self.ol_counts[-1] += 1
                marker = f"{self.ol_counts[-1]}."
            self.prefix = "  " * self.item_depth + marker + " "
            self.item_depth += 1

    def _leave(self, node: LexborNode) -> None:
        tag = node.tag
        if tag == "ol" and self.ol_counts:
            self.ol_counts.pop()
        if tag == "pre":
            self._flush(keep_lines=True)
            self.pre_depth -= 1
        elif tag in _BLOCKS:
            self._flush()
            if tag == "li":
                self.item_depth -= 1
            elif tag in ("ul", "ol", "dl", "table", "menu", "dir") and not self.item_depth:
                self.in_lines = False  # the list or table ended: a blank line follows

    def _text(self, text: str) -> None:
        if not self.pre_depth:
            # Source newlines are just whitespace; only <br> (appended as "\n") breaks a
            # line. _flush collapses the rest.
            text = text.replace("\n", " ").replace("\r", " ")
        self.inline.append(text)

    def _heading(self, level: int, node: LexborNode) -> None:
        self._flush()
        title = _collapse(node.text(deep=True, separator=" "))
        if not title:
            return
        self.sections.add("\n".join(self.blocks), self.path.path())
        self.blocks = []
        self.in_lines = False
        self.path.enter(level, title)

    def _row(self, row: LexborNode) -> None:
        self._flush()
        cells = [_collapse(cell.text(deep=True, separator=" ")) for cell in row.css("td, th")]
        line = " | ".join(c for c in cells if c)
        if line:
            self._emit(line, line=True)

    def _flush(self, *, keep_lines: bool = False) -> None:
        """End the paragraph being read (at a block boundary)."""
        raw = "".join(self.inline)
        self.inline = []
        if keep_lines:
            text = raw.strip("\n")
        else:
            text = "\n".join(_collapse(part) for part in raw.split("\n")).strip()
        if text.strip():
            text, self.prefix = self.prefix + text, ""
            self._emit(text, line=self.item_depth > 0)

    def _emit(self, text: str, *, line: bool) -> None:
        """List items and table rows are single lines, one newline apart; everything
        else is a paragraph, a blank line apart."""
        if self.blocks and not (line and self.in_lines):
            self.blocks.append("")
        self.blocks.append(text)
        self.in_lines = line


def check_depth(html: str, limit: int) -> None:
    """Refuse markup nested deeper than `limit` before parsing it.

    The HTML parsing algorithm walks the stack of open elements for each start tag, so
    parse time grows with the square of the nesting (200,000 nested <div> took 98 s).
    This one linear pass estimates the stack as the parser builds it: void elements and
    those whose end tag may be omitted (p, li, td...) do not nest, an end tag closes
    everything opened after its element, a heading closes an open heading, and `/>`
    closes only inside SVG and MathML."""
    stack: list[str] = []
    open_count: dict[str, int] = {}
    pos = 0
    while True:
        lt = html.find("<", pos)
        if lt < 0:
            return
        if html.startswith("<!--", lt):
            end = html.find("-->", lt + 4)
            if end < 0:
                return
            pos = end + 3
            continue
        tag = _TAG.match(html, lt)
        if tag is None:
            pos = lt + 1
            continue
        gt = html.find(">", tag.end())
        if gt < 0:
            return  # an unterminated tag runs to the end of the document
        pos = gt + 1
        name = tag.group(2).lower()
        if tag.group(1):
            if open_count.get(name):
                while stack:
                    top = stack.pop()
                    open_count[top] -= 1
                    if top == name:
                        break
            continue
        if name in _RAW_TEXT:
            close = _RAW_TEXT_END[name].search(html, pos)
            if close is None:
                return
            pos = close.start()
            continue
        foreign = open_count.get("svg") or open_count.get("math")
        if name in _NO_NESTING or (foreign and html[gt - 1] == "/"):
            continue
        if name in _HEADINGS and stack and stack[-1] in _HEADINGS:
            open_count[stack.pop()] -= 1  # a heading start tag closes an open heading
        stack.append(name)
        open_count[name] = open_count.get(name, 0) + 1
        if len(stack) > limit:
            raise LimitExceeded("the element nesting depth", limit, "rag_max_html_depth")
