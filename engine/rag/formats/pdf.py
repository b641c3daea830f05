"""PDF through pypdfium2: one section per page, lines re-joined into paragraphs."""

from __future__ import annotations

import ctypes
import inspect
import itertools
import re
import threading

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from engine.rag.formats.common import ExtractLimits, FormatError, LimitExceeded, SectionList
from engine.rag.types import Extracted

# PDFium is not thread-safe (concurrent use segfaults), and ingest may extract in worker
# threads: one document at a time per process. Any other pypdfium2 user must hold it too.
PDFIUM_LOCK = threading.Lock()

# pypdfium2 4.28-4.x redirects a default get_text_range() to get_text_bounded(), whose
# text indices do not map back to characters (and it warns); force_this keeps the real
# call. 5.x has no such parameter and always makes the real call.
_TEXT_RANGE_ARGS = (
    {"force_this": True}
    if "force_this" in inspect.signature(pdfium.PdfTextPage.get_text_range).parameters
    else {}
)

# pdfium marks a hyphen it recognised at a line end as U+FFFE (and then joins the lines);
# U+00AD is a soft hyphen from the document itself.
_HYPHEN_MARKS = ("\ufffe", "\u00ad")
_LIGATURES = str.maketrans(
    {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl"}
)
_SPACES = re.compile(r"[ \t\u00a0]+")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
_LINE = re.compile(r"([^\r\n]*)(\r\n|\r|\n|$)")
# A gap between baselines this much wider than the page's usual line spacing starts a new
# paragraph; so does one wider than this many line heights when there is no usual spacing.
_PARAGRAPH_GAP = 1.3
_LONE_LINE_GAP = 1.5


def extract_pdf(data: bytes, limits: ExtractLimits) -> Extracted:
    # A truncated file lacks the %%EOF after its last cross-reference offset. pdfium
    # refuses most truncated files but opens one cut anywhere after its trailer (and
    # rebuilds damaged cross-reference tables): checking the marker makes "truncated"
    # a clear answer instead of depending on where the cut fell.
    last_xref = data.rfind(b"startxref")
    if last_xref < 0 or data.find(b"%%EOF", last_xref) < 0:
        raise FormatError("corrupt or truncated PDF (no end-of-file marker)")
    with PDFIUM_LOCK:
        try:
            document = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as exc:
            raise FormatError(_open_problem(exc)) from exc
        try:
            title = (document.get_metadata_value("Title") or "").strip() or None
            sections = SectionList(limits.max_chars)
            if len(document) > limits.max_pages:
                raise LimitExceeded("the page count", limits.max_pages, "rag_max_pdf_pages")
            for index in range(len(document)):
                page = document[index]
                try:
                    textpage = page.get_textpage()
                    try:
                        # Counted before the text is read: pages can share one content
                        # stream, so a few KB of PDF can hold millions of characters.
                        if textpage.count_chars() > limits.max_page_chars:
                            raise LimitExceeded(
                                f"page {index + 1}'s text",
                                limits.max_page_chars,
                                "rag_max_pdf_page_chars",
                            )
                        sections.add(_page_text(textpage), page=index + 1)
                    finally:
                        textpage.close()
                finally:
                    page.close()
        except pdfium.PdfiumError as exc:
            raise FormatError(f"corrupt PDF ({exc})") from exc
        finally:
            document.close()
    if not sections.sections:
        raise FormatError("no extractable text (a scanned or image-only PDF? OCR is not supported)")
    return Extracted(format="pdf", title=title, sections=sections.sections)


def _open_problem(exc: pdfium.PdfiumError) -> str:
    # pypdfium2 < 5 does not attach the code; under the lock the last error is still ours.
    code = getattr(exc, "err_code", None)
    if code is None:
        code = pdfium_c.FPDF_GetLastError()
    if code == pdfium_c.FPDF_ERR_PASSWORD:
        return "encrypted PDF: it needs a password"
    if code == pdfium_c.FPDF_ERR_SECURITY:
        return "encrypted PDF with an unsupported security handler"
    return "corrupt PDF (cannot be opened)"


def _page_text(textpage: pdfium.PdfTextPage) -> str:
    """The page's text with paragraphs separated by blank lines.

    pdfium returns one line of text per visual line and no paragraph structure, so where
    a paragraph ends is read from the geometry: a gap between baselines clearly wider
    than the page's usual line spacing, or a jump upwards (a new column or block)."""
    text = textpage.get_text_range(**_TEXT_RANGE_ARGS)
    geometry = _Geometry(textpage)
    # pdfium counts text indices in UTF-16 code units; they equal str indices unless the
    # page has characters outside the BMP.
    length = _utf16_len if _ASTRAL.search(text) else len
    # Per line: its text, and (top baseline, bottom baseline, height) when known. The two
    # baselines differ when pdfium has already joined a line broken at a hyphen.
    lines: list[tuple[str, tuple[float, float, float] | None]] = []
    offset = 0
    for match in _LINE.finditer(text):
        raw, newline = match.group(1), match.group(2)
        if not raw and not newline:
            break  # the empty match at the end of the text
        stripped = raw.strip()
        where = None
        if stripped:
            first = offset + length(raw[: len(raw) - len(raw.lstrip())])
            last = offset + length(raw.rstrip()) - 1
            top = geometry.baseline_and_height(first)
            bottom = geometry.baseline(last)
            if top is not None and bottom is not None:
                where = (top[0], bottom, top[1])
        if "  " in stripped or "\t" in stripped or "\xa0" in stripped:
            stripped = _SPACES.sub(" ", stripped)
        lines.append((stripped, where))
        offset += length(raw) + len(newline)
    spacing = _usual_spacing([w for _, w in lines])
    paragraphs: list[list[str]] = [[]]
    previous: tuple[float, float, float] | None = None
    for line, where in lines:
        if not line:
            paragraphs.append([])
            previous = None
            continue
        if previous and where and _new_paragraph(previous, where, spacing):
            paragraphs.append([])
        paragraphs[-1].append(line)
        previous = where or previous
    return "\n\n".join(_join_lines(p) for p in paragraphs if p).translate(_LIGATURES)


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class _Geometry:
    """Character positions through pdfium's raw API, reusing the ctypes out-parameters
    (this runs for every line of every page)."""

    def __init__(self, textpage: pdfium.PdfTextPage) -> None:
        self.raw = textpage.raw
        self.x, self.y = ctypes.c_double(), ctypes.c_double()
        self.box = pdfium_c.FS_RECTF()

    def baseline(self, text_index: int) -> float | None:
        char = pdfium_c.FPDFText_GetCharIndexFromTextIndex(self.raw, text_index)
        if char < 0 or not pdfium_c.FPDFText_GetCharOrigin(
            self.raw, char, ctypes.byref(self.x), ctypes.byref(self.y)
        ):
            return None
        return self.y.value

    def baseline_and_height(self, text_index: int) -> tuple[float, float] | None:
        """The height comes from the loose box (font ascent to descent) because it
        includes the text matrix; the nominal font size does not when a producer scales a
        1-point font."""
        y = self.baseline(text_index)
        if y is None or not pdfium_c.FPDFText_GetLooseCharBox(
            self.raw,
            pdfium_c.FPDFText_GetCharIndexFromTextIndex(self.raw, text_index),
            ctypes.byref(self.box),
        ):
            return None
        height = abs(self.box.top - self.box.bottom)
        return (y, height) if height > 0 else None


def _usual_spacing(positions: list[tuple[float, float, float] | None]) -> float | None:
    """The page's ordinary distance between consecutive baselines: a low quantile of the
    gaps, since most line breaks fall inside paragraphs."""
    gaps = []
    for above, below in itertools.pairwise(positions):
        if above and below:
            gap = above[1] - below[0]
            if 0 < gap < 4 * max(above[2], below[2]):
                gaps.append(gap)
    if len(gaps) < 2:
        return None
    gaps.sort()
    return gaps[len(gaps) // 4]


def _new_paragraph(
    above: tuple[float, float, float], below: tuple[float, float, float], spacing: float | None
) -> bool:
    gap = above[1] - below[0]  # PDF y grows upwards: the next line has a lower y
    height = max(above[2], below[2])
    if gap < -0.5 * height:
        return True  # above the previous line: a new column or block
    if spacing is None:
        return gap > _LONE_LINE_GAP * height
    return gap > max(_PARAGRAPH_GAP * spacing, 0.5 * height)


def _join_lines(lines: list[str]) -> str:
    out = lines[0]
    for line in lines[1:]:
        if out.endswith(_HYPHEN_MARKS):
            out = out[:-1] + line
        elif out.endswith("-") and len(out) > 1 and out[-2].isalpha() and line[0].islower():
            out = out[:-1] + line  # "exam-" + "ple": a word broken at the margin
        else:
            out = out + " " + line
    for mark in _HYPHEN_MARKS:
        out = out.replace(mark, "")  # pdfium already joined the lines around these
    return out
