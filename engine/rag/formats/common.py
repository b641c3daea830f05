"""Helpers shared by the format extractors: the error they raise and heading paths."""

from __future__ import annotations

import re

from engine.rag.types import Section

# C0/C1 control characters other than tab and newline: never useful in indexed text and
# they confuse tokenizers.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_RUN = re.compile(r"\n{3,}")


class FormatError(Exception):
    """A document that cannot be extracted. `extract` turns it into an InvalidRequest that
    names the file, so the format modules need not know the file name."""

    def __init__(self, problem: str, code: str = "invalid_document") -> None:
        super().__init__(problem)
        self.problem = problem
        self.code = code


def tidy(text: str) -> str:
    """Normalise newlines, drop control characters and trailing blanks, and keep at most
    one blank line between paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text.replace("\f", "\n\n"))
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_RUN.sub("\n\n", text).strip()


class HeadingPath:
    """The stack of enclosing headings by level, rendered as "A > B > C"."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, str]] = []

    def enter(self, level: int, title: str) -> None:
        # A heading closes every open heading of the same or a deeper level.
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        self._stack.append((level, title))

    def path(self) -> str | None:
        return " > ".join(t for _, t in self._stack) or None


class SectionList:
    """Collects sections, skipping those with no text (a heading directly followed by a
    sub-heading adds nothing to retrieve; its title lives on in the sub-heading's path)."""

    def __init__(self) -> None:
        self.sections: list[Section] = []

    def add(self, text: str, heading: str | None = None, page: int | None = None) -> None:
        text = tidy(text)
        if text:
            self.sections.append(Section(text=text, page=page, heading=heading))
