"""Document text extraction for RAG ingest: pick the format from the file name and the
content, extract it into sections, and turn every failure into a 400 (413 for a budget)
naming the file.

`extract_payload` is the same work as plain data in and out: the server runs it in the
sandbox's worker processes (engine.sandbox) under time and memory budgets, so this module
and the format modules must never import MLX."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import structlog

from engine.config import Settings
from engine.errors import ERROR_STATUS, ErrorCode, FusionError, InvalidRequest, PayloadTooLarge
from engine.rag.formats.common import ExtractLimits, FormatError, LimitExceeded
from engine.rag.types import Extracted, Section

log = structlog.get_logger(__name__)

SUPPORTED = "PDF, HTML, Markdown or plain text"

_EXTENSIONS = {
    ".pdf": "pdf",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
}
# File name extensions read as documents (what `fusion ingest` picks up in a directory).
EXTENSIONS = frozenset(_EXTENSIONS)
_CONTENT_TYPES = {
    "application/pdf": "pdf",
    "text/html": "html",
    "application/xhtml+xml": "html",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "text/plain": "text",
}
# Extensions of formats we know we cannot read: refused by name, so a .docx gets a clear
# answer instead of being sniffed as (zip) binary or, worse, decoded as text.
# fmt: off
_UNSUPPORTED_EXTENSIONS = frozenset({
    ".doc", ".docx", ".odt", ".rtf", ".xls", ".xlsx", ".ods", ".ppt", ".pptx", ".odp", ".epub",
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".heic", ".svg", ".ico",
    ".mp3", ".wav", ".ogg", ".flac", ".mp4", ".mov", ".avi", ".mkv", ".webm",
    ".zip", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".tar", ".exe", ".dll", ".so", ".dylib",
    ".bin", ".iso", ".dmg", ".sqlite", ".db", ".parquet", ".pkl", ".npy", ".safetensors", ".gguf",
    ".woff", ".woff2", ".ttf", ".otf", ".ps", ".eps",
})
# fmt: on
# Well-known signatures, for a useful message about binary data under any name. Only
# signatures that plain text cannot start with: other binary data is caught by decoding.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"PK\x03\x04", "a ZIP archive or an Office/EPUB document"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "a legacy Office document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\x7fELF", "an executable"),
    (b"{\\rtf", "an RTF document"),
    (b"%!PS", "a PostScript document"),
    (b"SQLite format 3\x00", "an SQLite database"),
)
_PDF_HEADER = b"%PDF-"
# Readers accept the PDF header after up to 1 KiB of junk; we do so only for .pdf names, so
# a text that merely mentions "%PDF-" is not taken for a PDF.
_PDF_HEADER_WINDOW = 1024
# What an HTML document starts with once leading comments are skipped (in code: a pattern
# repeating lazy `<!--.*?-->` backtracks exponentially, 125 s for 241 bytes).
_HTML_TAG_START = re.compile(rb"<(?:!doctype\s+html|html[\s>]|head[\s>]|body[\s>])", re.IGNORECASE)
_SNIFF_BYTES = 4096


def extract_limits(settings: Settings) -> ExtractLimits:
    return ExtractLimits(
        max_chars=settings.rag_max_document_chars,
        max_pages=settings.rag_max_pdf_pages,
        max_page_chars=settings.rag_max_pdf_page_chars,
        max_html_depth=settings.rag_max_html_depth,
    )


def extract_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """`extract` for the sandbox: payload {filename, data, content_type, limits} (limits as
    ExtractLimits' fields); the answer is {format, title, sections: [[text, page,
    heading]...]} or {error: {message, code}}, errors as data so the code (which fixes
    the status) survives the trip between processes."""
    try:
        extracted = extract(
            payload["filename"],
            payload["data"],
            payload.get("content_type"),
            ExtractLimits(**payload["limits"]),
        )
    except FusionError as exc:
        return {"error": {"message": exc.message, "code": exc.code}}
    return {
        "format": extracted.format,
        "title": extracted.title,
        "sections": [[s.text, s.page, s.heading] for s in extracted.sections],
    }


def extracted_from_payload(filename: str, answer: dict[str, Any]) -> Extracted:
    """The inverse of `extract_payload`'s answer: the Extracted, or the error it reports."""
    error = answer.get("error")
    if error is not None:
        code = ErrorCode(error["code"])
        kind = PayloadTooLarge if ERROR_STATUS[code] == PayloadTooLarge.status else InvalidRequest
        raise kind(error["message"], param="files", code=code, details={"file": filename})
    sections = [Section(text=t, page=p, heading=h) for t, p, h in answer["sections"]]
    return Extracted(format=answer["format"], title=answer["title"], sections=sections)


def extract(
    filename: str,
    data: bytes,
    content_type: str | None = None,
    limits: ExtractLimits | None = None,
) -> Extracted:
    """Extract a document's text as sections.

    The extension chooses the format unless the content says otherwise (a PDF signature
    or an HTML document start); without a known extension the content (then the declared
    content type) decides, and anything that decodes as text is read as plain text.
    Raises InvalidRequest (param `files`, code `unsupported_format` or
    `invalid_document`) naming the file and the problem, or PayloadTooLarge (code
    `document_too_large`) naming the budget's setting; `limits` default to Settings'."""
    name = filename or "(unnamed file)"
    limits = limits or extract_limits(Settings())
    try:
        if not data.strip():
            raise FormatError("empty document")
        kind = detect_format(name, data, content_type)
        extracted = _extract_as(kind, data, limits, _charset(content_type))
        if not extracted.sections:
            raise FormatError("empty document (no extractable text)")
        return extracted
    except LimitExceeded as exc:
        raise PayloadTooLarge(
            f"{name}: {exc.problem}", param="files", code=exc.code, details={"file": name}
        ) from exc
    except FormatError as exc:
        raise _invalid(name, exc.problem, exc.code) from exc
    except MemoryError:
        raise  # over the sandbox's memory budget: its caller answers 413 naming the setting
    except Exception as exc:  # a parser's own failure on hostile input: still a 400
        log.warning("rag.extract.failed", file=name, error=repr(exc))
        raise _invalid(name, f"the document could not be read ({type(exc).__name__})") from exc


def detect_format(filename: str, data: bytes, content_type: str | None = None) -> str:
    """pdf | html | markdown | text; raises FormatError(unsupported_format)."""
    suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    by_name = _EXTENSIONS.get(suffix)
    if data.lstrip(b"\xef\xbb\xbf \t\r\n\x00").startswith(_PDF_HEADER) or (
        by_name == "pdf" and _PDF_HEADER in data[:_PDF_HEADER_WINDOW]
    ):
        return "pdf"  # a signature is more reliable than a name
    if by_name != "html" and _looks_like_html(data[:_SNIFF_BYTES]):
        return "html"  # e.g. a page saved under a .txt or .pdf name
    if by_name == "pdf":
        raise FormatError("not a PDF (no %PDF- header)")
    if by_name is not None:
        return by_name
    if suffix in _UNSUPPORTED_EXTENSIONS:
        raise FormatError(
            f"unsupported format '{suffix}'; {SUPPORTED} expected",
            code=ErrorCode.UNSUPPORTED_FORMAT,
        )
    for magic, what in _MAGIC:
        if data.startswith(magic):
            raise FormatError(
                f"unsupported format ({what}); {SUPPORTED} expected",
                code=ErrorCode.UNSUPPORTED_FORMAT,
            )
    by_type = _CONTENT_TYPES.get(_media_type(content_type))
    # pdf by type alone is impossible here: the signature check above found none.
    return by_type if by_type in ("html", "markdown") else "text"


def _looks_like_html(head: bytes) -> bool:
    at = _skip_blanks(head, 3 if head.startswith(b"\xef\xbb\xbf") else 0)
    while head.startswith(b"<!--", at):
        end = head.find(b"-->", at + 4)
        if end < 0:
            return False
        at = _skip_blanks(head, end + 3)
    return _HTML_TAG_START.match(head, at) is not None


def _skip_blanks(data: bytes, at: int) -> int:
    while at < len(data) and data[at] in b" \t\r\n\f\v":
        at += 1
    return at


def _extract_as(kind: str, data: bytes, limits: ExtractLimits, charset: str | None) -> Extracted:
    # Imported on use: a text upload need not load pdfium or the HTML parser.
    extractor: Callable[..., Extracted]
    if kind == "pdf":
        from engine.rag.formats.pdf import extract_pdf

        return extract_pdf(data, limits)
    if kind == "html":
        from engine.rag.formats.html import extract_html as extractor
    elif kind == "markdown":
        from engine.rag.formats.markdown import extract_markdown as extractor
    else:
        from engine.rag.formats.text import extract_text as extractor
    return extractor(data, limits, charset)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _charset(content_type: str | None) -> str | None:
    match = re.search(r";\s*charset\s*=\s*\"?([\w.:-]+)", content_type or "", re.IGNORECASE)
    return match.group(1) if match else None


def _invalid(
    name: str, problem: str, code: ErrorCode = ErrorCode.INVALID_DOCUMENT
) -> InvalidRequest:
    return InvalidRequest(f"{name}: {problem}", param="files", code=code, details={"file": name})
