"""Helpers shared by the format extractors: the error they raise and heading paths."""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.errors import ErrorCode
from engine.rag.types import Section

# C0/C1 control characters other than tab and newline: never useful in indexed text and
# they confuse tokenizers.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BLANK_RUN = re.compile(r"\n{3,}")


class FormatError(Exception):
    """A document that cannot be extracted. `extract` turns it into an InvalidRequest that
    names the file, so the format modules need not know the file name."""

    def __init__(self, problem: str, code: ErrorCode = ErrorCode.INVALID_DOCUMENT) -> None:
        super().__init__(problem)
        self.problem = problem
        self.code = code


def tidy(text: str) -> str:
    """Normalise newlines, drop control characters and trailing blanks, and keep at most
    one blank line between paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text.replace("\f", "\n\n"))
    # Per line, not a `[ \t]+\n` pattern: that one backtracks over every run of blanks.
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    return _BLANK_RUN.sub("\n\n", text).strip()


@dataclass(frozen=True)
class ExtractLimits:
    """Budgets on what one document may extract to (Settings `rag_max_*`; see
    `engine.rag.extract.extract_limits`). Plain ints: they cross to the sandbox worker."""

    max_chars: int  # rag_max_document_chars
    max_pages: int  # rag_max_pdf_pages
    max_page_chars: int  # rag_max_pdf_page_chars
    max_html_depth: int  # rag_max_html_depth


class LimitExceeded(FormatError):
    """A document over one of the extraction budgets: 413, naming the limit's setting."""

    def __init__(self, what: str, limit: int, setting: str) -> None:
        super().__init__(
            f"{what} exceeds the limit of {limit:,} (setting {setting})",
            code=ErrorCode.DOCUMENT_TOO_LARGE,
        )


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
    sub-heading adds nothing to retrieve; its title lives on in the sub-heading's path),
    and stops the extraction once the document's text passes `max_chars`."""

    def __init__(self, max_chars: int) -> None:
        self.sections: list[Section] = []
        self.max_chars = max_chars
        self.chars = 0

    def add(self, text: str, heading: str | None = None, page: int | None = None) -> None:
        text = tidy(text)
        if text:
            self.chars += len(text)
            if self.chars > self.max_chars:
                raise LimitExceeded("the extracted text", self.max_chars, "rag_max_document_chars")
            self.sections.append(Section(text=text, page=page, heading=heading))
